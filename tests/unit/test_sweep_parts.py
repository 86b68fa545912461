"""The toy latent-scaling sweep's parts: epochs of N steps, latent geometry, the job runner,
and the job graph (both methods get the same runs, seeds and budgets)."""
import json
import sys

import pytest
import torch

from experiments.jobs import Job, JobFailed, done_record, run_jobs
from experiments.sweep import SweepPlan, check_settings, final_runs, jobs_for
from experiments.sweep_methods import CHAINED
from pipeline.engine.sampler import RankSharding, rank_indices
from pipeline.latent.geometry import norm_ratio, pairwise_cosine, per_problem, summarise, vocab_centre

pytestmark = pytest.mark.unit


def test_steps_per_epoch_draws_a_fresh_subset_each_epoch():
    plan = RankSharding(micro_batch_size=4, grad_accum=2, rank=0, world=1, seed=0)
    full = rank_indices(100, plan, 0, shuffle=True)
    capped = rank_indices(100, plan, 0, shuffle=True, max_steps=3)
    assert len(full) == 24 and capped == full[:6]               # 3 steps x 2 accumulation micro-batches
    assert rank_indices(100, plan, 1, shuffle=True, max_steps=3) != capped
    assert len(rank_indices(100, plan, 0, shuffle=True, max_steps=1000)) == 24   # never more than the data


def test_latent_geometry_against_hand_computed_distances():
    latents = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]],      # pairs 5, 10, 5 -> mean 20/3
                            [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])     # collapsed: all on one point
    inter, to_centre = per_problem(latents, torch.tensor([0.0, 0.0]))
    assert torch.allclose(inter, torch.tensor([20 / 3, 0.0]))
    assert torch.allclose(to_centre, torch.tensor([5.0, 2 ** 0.5]))
    single, _ = per_problem(latents[:, :1], torch.zeros(2))
    assert torch.isnan(single).all()                                    # no pairs with one latent
    mask = torch.tensor([[True, True, False], [True, False, False]])     # each problem's own latents only
    inter, to_centre = per_problem(latents, torch.tensor([0.0, 0.0]), mask)
    assert inter[0].item() == pytest.approx(5.0) and torch.isnan(inter[1])
    assert torch.allclose(to_centre, torch.tensor([2.5, 2 ** 0.5]))
    cosine = pairwise_cosine(torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], [[1.0, 1.0], [2.0, 2.0], [0.0, 1.0]]]),
                             torch.tensor([[True, True, True], [True, True, False]]))
    assert torch.allclose(cosine, torch.tensor([1 / 3, 1.0]))           # (0 + 1 + 0) / 3 pairs; the masked one out
    assert torch.isnan(pairwise_cosine(latents[:, :1])).all()
    ratio = norm_ratio(latents, torch.tensor([5.0, 2 ** 0.5]), mask)
    assert torch.allclose(ratio, torch.tensor([0.5, 1.0]))   # norms 0 and 5 over 5; sqrt 2 over itself
    centre, spread = vocab_centre(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]))
    assert torch.equal(centre, torch.zeros(2)) and spread == pytest.approx(1.5)
    rows = [{"inter_latent_l2": 2.0, "to_vocab_centre_l2": 4.0, "latent_cosine": 0.5, "latent_norm_ratio": 2.0},
            {"inter_latent_l2": float("nan"), "to_vocab_centre_l2": 6.0, "latent_cosine": float("nan"),
             "latent_norm_ratio": 4.0}, {"hash": True}]
    assert summarise(rows, 1.5) == {"inter_latent_l2": 2.0, "to_vocab_centre_l2": 5.0, "latent_cosine": 0.5,
                                    "latent_norm_ratio": 3.0, "embedding_to_centre_l2": 1.5, "problems": 2}
    assert summarise([{"hash": True}], 1.5) is None


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_jobs_run_after_their_dependencies_and_resume(tmp_path):
    order = tmp_path / "order.txt"
    write = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + chr(10))"
    jobs = [Job("b", [_py(write) + [str(order), "b"]], after=["a"]),
            Job("a", [_py(write) + [str(order), "a1"], _py(write) + [str(order), "a2"]])]
    run_jobs(jobs, str(tmp_path), lanes=2, threads=1, cwd=str(tmp_path), say=lambda *_: None)
    assert order.read_text().split() == ["a1", "a2", "b"]
    assert done_record(str(tmp_path), "a")["commands"][1][-1] == "a2"
    assert "$ " in (tmp_path / "logs" / "a.log").read_text()
    said = []
    run_jobs(jobs, str(tmp_path), lanes=2, threads=1, cwd=str(tmp_path), say=said.append)
    assert order.read_text().split() == ["a1", "a2", "b"] and "2 of 2 jobs already done" in said[0]


def test_a_job_whose_commands_changed_reruns_from_clean_and_so_do_the_jobs_after_it(tmp_path):
    out, stale = tmp_path / "out", tmp_path / "stale"
    def jobs(word):
        return [Job("a", [_py("pass")]), Job("b", [_py(f"print('{word}')")], clean=[str(stale)]),
                Job("c", [_py("pass")], after=["b"])]
    quiet = dict(lanes=1, threads=1, cwd=str(tmp_path), say=lambda *_: None)
    run_jobs(jobs("one"), str(out), **quiet)
    stale.mkdir()
    said = []
    run_jobs(jobs("one"), str(out), **{**quiet, "say": said.append})
    assert "3 of 3 jobs already done" in said[0] and stale.exists()         # same commands: kept
    said.clear()
    run_jobs(jobs("two"), str(out), **{**quiet, "say": said.append})
    assert "1 of 3 jobs already done" in said[0] and not stale.exists()     # b changed: b and c rerun
    assert "two" in (out / "logs" / "b.log").read_text()
    assert done_record(str(out), "b")["commands"][0][-1] == "print('two')"


def test_a_failed_job_stops_the_graph_and_names_its_log(tmp_path):
    jobs = [Job("bad", [_py("import sys; print('boom'); sys.exit(3)")]), Job("later", [_py("")], after=["bad"])]
    with pytest.raises(JobFailed, match=r"job bad failed \(exit 3\); see .*logs/bad.log"):
        run_jobs(jobs, str(tmp_path), lanes=1, threads=1, cwd=str(tmp_path), say=lambda *_: None)
    assert "boom" in (tmp_path / "logs" / "bad.log").read_text()
    assert done_record(str(tmp_path), "later") is None and done_record(str(tmp_path), "bad") is None


def _overrides(job: Job) -> dict:
    command = job.commands[0]
    return dict(arg.split("=", 1) for arg in command[command.index("--config") + 2:])


def test_the_job_graph_gives_both_methods_the_same_runs_and_budgets(tmp_path):
    plan = SweepPlan(str(tmp_path), (1, 3), stage_steps=50, final_steps=70)
    jobs = {job.name: job for job in jobs_for(plan, "SHARDS")}
    assert set(jobs) == {"train-cot", "train-nocot", "eval-cot", "eval-nocot"} | {
        f"{kind}-{m}-{n}" for kind in ("train", "eval") for m in CHAINED for n in (1, 3)} | {
        f"train-{m}-chain" for m in CHAINED}
    coconut, simcot = _overrides(jobs["train-coconut-chain"]), _overrides(jobs["train-simcot-chain"])
    assert {k: v for k, v in simcot.items() if k not in ("name", "method.simcot", "method.decoder_init")} == \
           {k: v for k, v in coconut.items() if k != "name"}
    assert simcot["method.decoder_init"] == "base"          # the recorded sweep's decoder: the CoT weights
    assert coconut["method.max_latent_stage"] == "3" and coconut["train.max_steps"] == "150"
    assert coconut["train.steps_per_epoch"] == "50" and coconut["checkpoint.keep_last"] == "0"
    final = _overrides(jobs["train-simcot-3"])
    assert final["checkpoint.init_from"] == str(tmp_path / "simcot-chain" / "checkpoints" / "epoch2")
    assert final["curriculum.start_stage"] == "4" and final["method.max_latent_stage"] == "3"
    assert final["train.max_steps"] == "70" and final["method.simcot"] == "true"
    assert jobs["train-simcot-3"].after == ["train-simcot-chain"] and jobs["eval-simcot-3"].after == ["train-simcot-3"]
    assert jobs["train-simcot-3"].clean == [str(tmp_path / "simcot-3")]     # a rerun never resumes a stale run
    assert "model.init_seed=1" in jobs_for(SweepPlan(str(tmp_path), (1,), seed=1), "S")[0].commands[0]


def test_equal_budget_runs_train_every_point_as_long_as_the_largest(tmp_path):
    plan = SweepPlan(str(tmp_path), (1, 2, 4), stage_steps=50, final_steps=70, equal_budget=True)
    finals = final_runs(plan)
    assert finals["coconut-1-equal"] == ("coconut", 1, 70 + 3 * 50) and finals["simcot-2-equal"] == ("simcot", 2, 170)
    assert "coconut-4-equal" not in finals and finals["coconut-4"] == ("coconut", 4, 70)
    for name, (_, n, steps) in finals.items():
        if name.endswith("-equal"):
            assert n * 50 + steps == 4 * 50 + 70                               # same latent training budget
    names = {job.name for job in jobs_for(plan, "S")}
    assert {"train-simcot-1-equal", "eval-simcot-1-equal", "train-simcot-1", "eval-coconut-2-equal"} <= names


def test_jacobi_variants_are_the_same_runs_with_parallel_latent_updates(tmp_path):
    plan = SweepPlan(str(tmp_path), (2,), stage_steps=50, final_steps=70, methods=("simcot",), jacobi=3)
    jobs = {job.name: job for job in jobs_for(plan, "S")}
    assert {name for name in jobs if "simcot" in name} == {
        "train-simcot-chain", "train-simcot-jacobi-chain", "train-simcot-2", "train-simcot-jacobi-2",
        "eval-simcot-2", "eval-simcot-jacobi-2"}
    for run in ("chain", "2"):
        sequential, jacobi = _overrides(jobs[f"train-simcot-{run}"]), _overrides(jobs[f"train-simcot-jacobi-{run}"])
        assert jacobi.pop("method.latent_update") == "jacobi" and jacobi.pop("method.jacobi_iterations") == "3"
        assert {k: v for k, v in jacobi.items() if k not in ("name", "checkpoint.init_from")} == \
               {k: v for k, v in sequential.items() if k not in ("name", "checkpoint.init_from")}
    start = _overrides(jobs["train-simcot-jacobi-2"])["checkpoint.init_from"]
    assert start == str(tmp_path / "simcot-jacobi-chain" / "checkpoints" / "epoch1")


def test_codi_points_train_from_cot_as_long_as_the_coconut_run_of_the_point(tmp_path):
    plan = SweepPlan(str(tmp_path), (2, 4), stage_steps=50, final_steps=70, methods=("simcot", "codi-simcot"))
    finals, jobs = final_runs(plan), {job.name: job for job in jobs_for(plan, "S")}
    assert finals["codi-simcot-2"] == ("codi-simcot", 2, 2 * 50 + 70) and finals["simcot-2"] == ("simcot", 2, 70)
    assert "train-codi-simcot-chain" not in jobs and jobs["train-codi-simcot-4"].after == ["train-cot"]
    codi = _overrides(jobs["train-codi-simcot-4"])
    assert codi["method.name"] == "codi" and codi["method.num_latent"] == "8" and codi["train.max_steps"] == "270"
    assert codi["checkpoint.init_from"] == str(tmp_path / "cot" / "checkpoints")


def test_a_resumed_sweep_must_have_the_same_data_settings(tmp_path):
    check_settings(str(tmp_path), {"points": (1, 2), "train": 100})
    check_settings(str(tmp_path), {"points": (1, 2), "train": 100})       # same: fine
    assert json.loads((tmp_path / "sweep.json").read_text())["points"] == [1, 2]
    with pytest.raises(SystemExit, match=r"train: 100 -> 200\); add --fresh"):
        check_settings(str(tmp_path), {"points": (1, 2), "train": 200})
