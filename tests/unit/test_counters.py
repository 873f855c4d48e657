"""HostCounters: the host ints are the truth while training, written through to the checkpointed
buffers; the buffers are re-read after a state-dict load and are what outside readers see."""
import torch

from trainer.build import build_module
from trainer.config import load_config
from trainer.counters import count_of, images_of, iteration_of


def _module():
    cfg = load_config("gan_digits", ["logging.wandb=false", "model.g_width=8", "model.d_width=8"])
    return build_module(cfg, channels=1, num_classes=10)


def test_training_counts_on_the_host_and_writes_through_to_the_buffers():
    m = _module()
    m.start_counting()
    m.add_count("iteration", 3)
    m.add_count("images_seen", 96)
    m.set_count("d_phase", 2)
    assert (m.it, m.seen, m.count("d_phase")) == (3, 96, 2)
    assert (int(m.iteration), int(m.images_seen), int(m.d_phase)) == (3, 96, 2)  # the checkpointed values
    m.iteration.fill_(7)  # nobody writes the buffers behind the mirror's back during training ...
    assert m.it == 3      # ... and were they to, the step would not read them (no device sync)
    assert iteration_of(m) == 3 and images_of(m) == 96 and count_of(m, "d_phase") == 2


def test_a_loaded_state_dict_is_read_once_into_the_mirror():
    src = _module()
    src.iteration.fill_(41)
    src.images_seen.fill_(1312)
    m = _module()
    m.start_counting()
    m.add_count("iteration", 1)
    m.load_state_dict(src.state_dict())
    assert (m.it, m.seen) == (41, 1312)
    m.add_count("iteration", 1)
    assert m.it == 42 and int(m.iteration) == 42


def test_outside_training_the_buffers_are_the_truth():
    m = _module()
    m.iteration.fill_(5)  # as tests and tools do
    assert m.it == 5 and iteration_of(m) == 5
    m.start_counting()
    m.stop_counting()
    m.iteration.fill_(9)
    assert m.it == 9


def test_checkpointed_counters_keep_their_names_and_type():
    """Old checkpoints load: the counters are still 0-dim long buffers under their old names."""
    state = _module().state_dict()
    for name in ("iteration", "d_steps", "d_phase", "images_seen", "nonfinite_total"):
        assert state[name].dtype == torch.long and state[name].dim() == 0
