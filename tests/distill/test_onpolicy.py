"""On-policy distillation (GKD): the share of on-policy micro-batches is exact, the pool is
what the student itself writes at that step (not the teacher, not stale weights), the loss
counts only the written positions, and an interrupted on-policy run resumes to the same weights."""

import copy

import pytest
import torch
from compress.distill.config import DistillConfig
from compress.distill.loop import TrainJob, TrainOptions, train_model
from compress.distill.onpolicy import is_on_policy, prompt_len, written_mask
from compress.distill.sources import Windows
from test_distill_run import _setup, tiny, w3  # noqa: F401  (module fixtures)

from compress.generation import sample


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0, 0.3])
def test_the_share_of_on_policy_micro_batches_is_exact(share):
    n = 1000
    on = [is_on_policy(m, share) for m in range(n)]
    assert sum(on) == round(n * share)
    if 0 < share < 1:  # spread: no run of off-policy batches longer than 1/share
        gaps = [j - i for i, j in zip([k for k, v in enumerate(on) if v], [k for k, v in enumerate(on) if v][1:])]
        assert max(gaps) <= -(-1 // share)


def test_written_mask_marks_the_positions_that_predict_written_tokens():
    m = written_mask(2, 10, 6)
    assert m.shape == (2, 10) and m[:, :5].sum() == 0 and m[:, 5:].all()


def test_the_pool_is_the_current_students_own_writing(tiny, w3):  # noqa: F811
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=3, restore_best=False, grad_accum=2)
    cfg = cfg.model_copy(update={"on_policy": 0.5, "on_policy_every": 1, "on_policy_tokens": 24})
    with torch.no_grad():  # a student whose next-token distributions are flat: its samples are its own
        student.model.norm.weight.mul_(0.05)
    source = Windows(train, cfg.batch_size, seed=0)
    P = prompt_len(64, cfg)
    seen = []

    def written_by(model, prompts, step):  # the loop's sampling: temperature 1, its generator for (seed 0, step)
        return sample(model, prompts, 64 - P, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(step))

    def check(step, pool):
        frozen = copy.deepcopy(student).eval()  # the student's weights at this step
        prompts = torch.cat([source.batch(m).x[:, :P] for m in pool])
        got = torch.cat(list(pool.values()))
        assert torch.equal(got[:, :P], prompts)  # the prompts are the training windows' beginnings
        assert torch.equal(got, written_by(frozen, prompts, step))  # what the student writes at this step
        seen.append((step, list(pool), got, written_by(teacher, prompts, step), frozen))

    rec = train_model(student, teacher, source, held, cfg, prep, samples=check)
    assert rec["steps"] == 3
    assert [m for _, ms, *_ in seen for m in ms] == [m for m in range(6) if is_on_policy(m, 0.5)] == [1, 3, 5]
    assert all(not torch.equal(got, by_teacher) for _, _, got, by_teacher, _ in seen)  # not the teacher's text
    # the last pool comes from the trained weights: the first step's weights would have written otherwise
    last_step, _, got, _, _ = seen[-1]
    assert not torch.equal(got, written_by(seen[0][4], got[:, :P], last_step))


def test_on_policy_loss_counts_only_the_written_positions(tiny, w3):  # noqa: F811
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, steps=1)
    cfg = cfg.model_copy(update={"on_policy": 1.0, "on_policy_tokens": 16})
    job = TrainJob(student, teacher, train, held, cfg, prep, TrainOptions())
    job.begin()
    from compress.distill.onpolicy import refresh

    job.st["pool"] = refresh(student, job.source, cfg, 0, 0)
    b = job.batch_of(0)
    assert b.mask.sum() == 17 * len(b.x)  # prompt's last position and the 16 written tokens
    loss = job.loss_of(b)
    assert torch.isfinite(loss)
    with torch.no_grad():
        full = job.loss_of(type(b)(b.x, None, b.idx))
    assert not torch.isclose(full, loss)  # the mask changes the loss (all positions vs the written ones)


def test_an_interrupted_on_policy_run_resumes_to_the_same_weights(tiny, w3, tmp_path):  # noqa: F811
    opts = dict(steps=4, save_every=1, restore_best=False, on_policy=0.5, on_policy_every=2, on_policy_tokens=16)
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, **opts)
    train_model(student, teacher, train, held, cfg, prep, seed=5)
    want = {n: p.detach().clone() for n, p in student.named_parameters()}
    state = tmp_path / "state.pt"
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, **opts)
    with pytest.raises(KeyboardInterrupt):
        train_model(student, teacher, train, held, cfg, prep, seed=5, state_path=state, interrupt_at=3)
    student, teacher, train, held, cfg, prep = _setup(tiny, w3, **opts)
    train_model(student, teacher, train, held, cfg, prep, seed=5, state_path=state, resume=True)
    got = dict(student.named_parameters())
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_on_policy_needs_the_online_teacher():
    with pytest.raises(ValueError, match="teacher: online"):
        DistillConfig(on_policy=0.5, teacher="topk")
