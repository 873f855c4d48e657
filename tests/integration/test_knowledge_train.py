"""Knowledge-constraint training through the config system: a learned class-consistency constraint on
a tiny conditional BigGAN resumes exactly (phi and its optimiser come back from the checkpoint), lambda = 0
leaves a GAN's training bit for bit unchanged, and the flow term's ESS guard skips and counts."""
import torch

from trainer.build import train
from trainer.checkpointing import load_checkpoint

from test_resume import _assert_same  # tests/integration is on sys.path (rootdir conftest)

COMMON = ["trainer.progress_bar=false", "logging.wandb=false", "trainer.deterministic=true", "trainer.sample_every=0",
          "trainer.log_every=1"]
BIGGAN = ["data.name=digits", "data.resolution=32", "model.g_width=4", "model.d_width=4", "model.shared_dim=8",
          "data.batch_size=8", "trainer.sample_grid=10", "knowledge.enabled=true", "knowledge.learned=true",
          "knowledge.classifier_epochs=1", "knowledge.phi_lr=0.01", "knowledge.keep_samples=8"]


def _knowledge_state(run_dir, it):
    ckpt = load_checkpoint(run_dir / "checkpoints" / f"iter-{it:07d}.ckpt")
    return ckpt["callbacks"].get("KnowledgeCallback"), ckpt["state_dict"]


def _callback(run):
    return next(cb for cb in run.trainer.callbacks if type(cb).__name__ == "KnowledgeCallback")


def test_irl_log_z_setting_reaches_the_phi_step(tmp_path):
    """knowledge.irl_log_z picks the IRL normaliser the callback uses: the same first step of a
    conditional model moves phi differently under pooled and per_class."""
    common = COMMON + BIGGAN + [f"logging.root={tmp_path}", f"eval.features_dir={tmp_path}/features",
                                "trainer.checkpoint.every_n_iters=1", "trainer.max_iters=1"]
    phi = {}
    for mode in ("pooled", "per_class"):
        run = train("biggan_mnist5k", common + [f"knowledge.irl_log_z={mode}", f"logging.run_id={mode}"])
        phi[mode] = _knowledge_state(run.run_dir, 1)[0]["phi"]
    assert any(not torch.equal(phi["pooled"][k], phi["per_class"][k]) for k in phi["pooled"])


def test_learned_constraint_resume_restores_phi_and_its_optimiser(tmp_path):
    common = COMMON + BIGGAN + [f"logging.root={tmp_path}", f"eval.features_dir={tmp_path}/features",
                                "trainer.checkpoint.every_n_iters=2"]
    full = train("biggan_mnist5k", common + ["trainer.max_iters=4", "logging.run_id=full"])
    half = train("biggan_mnist5k", common + ["trainer.max_iters=2", "logging.run_id=half"])
    resumed = train(None, [f"resume={half.run_dir}", "trainer.max_iters=4"])
    k_full, sd_full = _knowledge_state(full.run_dir, 4)
    k_half, _ = _knowledge_state(half.run_dir, 2)
    k_res, sd_res = _knowledge_state(resumed.run_dir, 4)
    assert k_full["counters"]["phi_steps"] == 4 and k_half["counters"]["phi_steps"] == 2
    moved = [n for n in k_full["phi"] if n.endswith("weight") and not torch.equal(k_half["phi"][n], k_full["phi"][n])]
    assert moved, "phi did not change between iterations 2 and 4"
    _assert_same(k_full, k_res, "knowledge state")  # phi, AdamW moments and step counts, lambda, counters
    _assert_same(sd_full, sd_res, "state_dict")
    stats = _callback(full).last_stats
    assert 0 < stats["knowledge/ess_frac"] <= 1 and stats["knowledge/f_student"] <= 0  # log-probabilities
    # log E_p exp(lambda f) >= lambda E_p f (Jensen), which the logged values must respect
    assert stats["knowledge/log_z"] >= stats["knowledge/lambda"] * stats["knowledge/f_student"] - 1e-5
    import csv

    with open(full.run_dir / "metrics.csv") as fh:  # knowledge rows are keyed by iteration like the rest
        rows = [r for r in csv.DictReader(fh) if r.get("knowledge/log_z")]
    assert rows and all(r["iteration"] and r["progress/kimg"] for r in rows)
    assert _callback(full).teacher_samples.shape == (8, 1, 32, 32)


def test_lambda_zero_gan_trains_exactly_like_the_plain_gan(tmp_path):
    common = COMMON + [f"logging.root={tmp_path}", "trainer.max_iters=2", "trainer.checkpoint.every_n_iters=2",
                       "model.g_width=8", "model.d_width=8"]
    plain = train("gan_digits", common + ["logging.run_id=plain"])
    zero = train("gan_digits", common + ["logging.run_id=zero", "knowledge.enabled=true",
                                         "knowledge.constraint=symmetry", "knowledge.lam=0"])
    sym = train("gan_digits", common + ["logging.run_id=sym", "knowledge.enabled=true",
                                        "knowledge.constraint=symmetry", "knowledge.lam=50"])
    sd = {r: _knowledge_state(run.run_dir, 2)[1] for r, run in (("plain", plain), ("zero", zero), ("sym", sym))}
    _assert_same(sd["plain"], sd["zero"], "state_dict")
    g_keys = [k for k, v in sd["plain"].items() if k.startswith("G.") and v.is_floating_point() and v.numel() > 10]
    assert g_keys and all(not torch.equal(sd["plain"][k], sd["sym"][k]) for k in g_keys[:1])


def test_flow_term_ess_guard_skips_and_counts(tmp_path):
    common = COMMON + [f"logging.root={tmp_path}", "trainer.max_iters=3", "trainer.checkpoint.every_n_iters=3",
                       "trainer.sample_grid=4"]
    plain = train("glow_digits", common + ["logging.run_id=plain"])
    guarded = train("glow_digits", common + ["logging.run_id=guarded", "knowledge.enabled=true",
                                             "knowledge.constraint=symmetry", "knowledge.lam=5",
                                             "knowledge.ess_min=1.0"])
    used = train("glow_digits", common + ["logging.run_id=used", "knowledge.enabled=true",
                                          "knowledge.constraint=symmetry", "knowledge.lam=5"])
    k_guard, sd_guard = _knowledge_state(guarded.run_dir, 3)
    k_used, sd_used = _knowledge_state(used.run_dir, 3)
    sd_plain = _knowledge_state(plain.run_dir, 3)[1]
    assert k_guard["counters"]["ess_skipped"] == 3 and k_used["counters"]["ess_skipped"] == 0
    _assert_same(sd_plain, sd_guard, "state_dict")  # every step skipped: the plain flow, bit for bit
    key = next(k for k, v in sd_plain.items() if k.startswith("glow.") and v.is_floating_point() and v.numel() > 10)
    assert not torch.equal(sd_plain[key], sd_used[key])
    assert 0 < _callback(used).last_stats["knowledge/ess_frac"] < 1


def test_resuming_with_knowledge_off_says_the_constraint_state_is_not_used(tmp_path, capsys):
    common = COMMON + [f"logging.root={tmp_path}", "trainer.checkpoint.every_n_iters=2", "model.g_width=8",
                       "model.d_width=8"]
    run = train("gan_digits", common + ["trainer.max_iters=2", "knowledge.enabled=true",
                                        "knowledge.constraint=symmetry"])
    capsys.readouterr()
    train(None, [f"resume={run.run_dir}", "trainer.max_iters=3", "knowledge.enabled=false"])
    assert "knowledge-constraint state (lambda, counters and a learned phi) is not used" in capsys.readouterr().err
