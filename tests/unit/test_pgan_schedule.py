"""Growing schedule: (level, alpha, phase, batch size) from images seen, at and around phase boundaries."""
import pytest

from trainer.pgan_schedule import FADE, STABLE, GrowSchedule, ScheduleError

# 4 px stable 100; 8 px fade 40 + stable 60; 16 px fade 20 + stable for ever
S = GrowSchedule([4, 8, 16], fade_images=[40, 20], stable_images=[100, 60, 50], batch_sizes=[16, 8, 4])


@pytest.mark.parametrize("seen,level,alpha,phase,batch", [
    (0, 0, 1.0, STABLE, 16),
    (99, 0, 1.0, STABLE, 16),
    (100, 1, 0.0, FADE, 8),      # first image of the 8 px fade-in
    (110, 1, 0.25, FADE, 8),
    (139, 1, 39 / 40, FADE, 8),
    (140, 1, 1.0, STABLE, 8),    # fade-in done
    (199, 1, 1.0, STABLE, 8),
    (200, 2, 0.0, FADE, 4),
    (215, 2, 0.75, FADE, 4),
    (220, 2, 1.0, STABLE, 4),
    (10 ** 9, 2, 1.0, STABLE, 4),  # the last level stabilises for ever
])
def test_phase_at_boundaries(seen, level, alpha, phase, batch):
    p = S.at(seen)
    assert (p.level, p.phase, p.batch_size, p.resolution) == (level, phase, batch, [4, 8, 16][level])
    assert p.alpha == pytest.approx(alpha, abs=1e-12)
    assert S.batch_at(seen) == batch


def test_single_values_apply_to_every_resolution_and_total():
    s = GrowSchedule([4, 8, 16, 32], [800_000], [800_000], [16])
    assert s.starts == [0, 800_000, 2_400_000, 4_000_000]
    assert s.batch_sizes == [16] * 4 and s.total_images() == 5_600_000
    assert GrowSchedule([32], [5], [7], [3]).at(10 ** 6).level == 0


@pytest.mark.parametrize("kw,msg", [
    (dict(fade_images=[1, 2, 3]), "fade_images has 3 entries"),
    (dict(stable_images=[1, 2]), "stable_images has 2 entries"),
    (dict(batch_sizes=[16, 8]), "batch_sizes has 2 entries"),
    (dict(batch_sizes=[16, 0, 4]), "must be positive"),
])
def test_mismatched_lists_are_refused(kw, msg):
    args = dict(fade_images=[40, 20], stable_images=[100, 60, 50], batch_sizes=[16, 8, 4], **{})
    args.update(kw)
    with pytest.raises(ScheduleError, match=msg):
        GrowSchedule([4, 8, 16], **args)
