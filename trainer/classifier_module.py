"""ClassifierModule: rule knowledge distillation (Hu et al. 2016) for a classifier p(y|x).

Each step sees the labelled set and a batch of unlabelled groups with side information (e.g. pairs of
digits with their sum). A ``teacher`` function turns the student's logits on a group plus its side
information into teacher log-probabilities log q (B, G, K) (rules applied in log space), and the loss is
    (1 - pi_t) CE(y, p) on labelled rows + pi_t KL(q || p) on unlabelled rows,
pi_t = min(pi0, 1 - decay^epochs) of unlabelled groups seen. ``accuracy`` reports both the student p
and the teacher q: the teacher at test time can carry most of the gain (Krishna et al. 2018).
"""
from __future__ import annotations

from typing import Callable, Dict

import lightning as L
import torch
import torch.nn as nn

from trainer.knowledge.teacher import distill_loss, pi_schedule

Teacher = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # logits (B, G, K), side (B,) -> log q (B, G, K)


class ClassifierModule(L.LightningModule):
    def __init__(self, net: nn.Module, teacher: Teacher, x_lab: torch.Tensor, y_lab: torch.Tensor,
                 groups_per_epoch: int, pi0: float = 0.9, decay: float = 0.95, lr: float = 0.05,
                 weight_decay: float = 1e-4, use_rule: bool = True):
        super().__init__()
        self.net, self.teacher = net, teacher
        self.register_buffer("x_lab", x_lab)
        self.register_buffer("y_lab", y_lab)
        self.register_buffer("groups_seen", torch.zeros((), dtype=torch.long))
        self.groups_per_epoch, self.pi0, self.decay = groups_per_epoch, pi0, decay
        self.lr, self.weight_decay, self.use_rule = lr, weight_decay, use_rule

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def pi(self) -> float:
        """0 without the rule: the plain supervised baseline."""
        return pi_schedule(int(self.groups_seen), self.groups_per_epoch, self.pi0, self.decay) if self.use_rule else 0.0

    def training_step(self, batch, batch_idx):
        x_unl, side = batch  # (B, G, ...) groups and their side information (B,)
        b, g = x_unl.shape[:2]
        logits_unl = self.net(x_unl.flatten(0, 1)).view(b, g, -1)
        log_q = self.teacher(logits_unl.detach(), side).flatten(0, 1)
        logits = torch.cat([self.net(self.x_lab), logits_unl.flatten(0, 1)])
        n_lab = self.x_lab.shape[0]
        labelled = torch.arange(logits.shape[0], device=self.device) < n_lab
        y = torch.cat([self.y_lab, torch.zeros(b * g, dtype=torch.long, device=self.device)])
        log_q = torch.cat([torch.log_softmax(logits[:n_lab].detach().float(), -1), log_q])
        pi = self.pi()
        loss = distill_loss(logits, y, log_q, pi, labelled, ~labelled)
        self.groups_seen += b
        self.log_dict({"train/loss": loss.detach(), "train/pi": pi}, prog_bar=False, logger=False)
        return loss

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, side: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        """Test accuracy of the student p (argmax p(y|x)) and of the teacher q (which also sees the side
        information) on groups x (B, G, ...) with labels y (B, G)."""
        self.net.eval()
        b, g = x.shape[:2]
        logits = self.net(x.flatten(0, 1)).view(b, g, -1)
        self.net.train()
        acc_p = (logits.argmax(-1) == y).float().mean()
        acc_q = (self.teacher(logits, side).argmax(-1) == y).float().mean()
        return {"acc_p": float(acc_p), "acc_q": float(acc_q)}
