"""Every DeepSpeed internal the ZeRO-3 patches use is behind the guard: each one missing is refused,
naming it and the setting that avoids it; an untested DeepSpeed version is refused (or warned
about with ``train.deepspeed_check=warn``); the paths ``after_backward`` does not reproduce are
refused. The real objects carry every name (the distributed tier runs the patches on them)."""
from types import SimpleNamespace

import pytest
import torch

from pipeline.engine import deepspeed_internals, gather_policy
from pipeline.engine.deepspeed_internals import DeepSpeedInternalError, check_version
from pipeline.engine.gather_policy import GATHERED, STREAMED, apply_gather_policy
from pipeline.engine.grad_reduce import AFTER_BACKWARD, OTHER_PATHS, apply_grad_reduce

pytestmark = pytest.mark.unit


class Offload:
    def __init__(self):
        self.forward_hooks, self.backward_hooks, self.removed = [], [], False

    def _remove_module_hooks(self):
        self.removed = True

    def partition_all_parameters(self):
        pass

    def post_sub_module_backward_function(self, module):
        pass


def _engine(offload_attrs=None, optimizer_attrs=None):
    """A stand-in with exactly the internals DeepSpeed 0.19.8's ZeRO-3 engine offers."""
    module = torch.nn.Linear(2, 2)
    weight = module.weight
    weight.ds_active_sub_modules, weight.ds_persist, weight.ds_process_group = set(), False, object()
    weight.ds_tensor, weight.ds_numel, weight.ds_shape, weight.ds_id = torch.zeros(4), 4, (2, 2), 0
    weight.ds_status = None
    module.post_bwd_fn = object()
    offload = Offload()
    optimizer = SimpleNamespace(parameter_offload=offload, _grad_acc_hooks=[], leaf_parameters={},
                                fp16_groups=[[weight]], independent_gradient_partition_epilogue=lambda: None,
                                partition_grads=None,
                                get_param_comm_dtype=None, reduce_bucket_size=10, reduce_scatter=True,
                                all2all_process_group=None, zenflow=False, use_muon=False,
                                autoep_folding_tp_group=None,
                                _DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads=lambda *a: None,
                                get_grad_norm_direct=lambda *a: None, _get_param_partition_group=lambda p: None,
                                _autoep_expert_parallel_group=lambda params: None, model_parallel_group=None,
                                model_parallel_rank=0, _DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition={},
                                micro_step_id=0, offload_optimizer=False, _offload_boundary_param_ids=set(),
                                dtype=torch.float32)
    for name in offload_attrs or ():
        delattr(offload, name)
    for name in optimizer_attrs or ():
        delattr(optimizer, name)
    return Engine(optimizer, module)


class Engine:
    """The engine's two parts the patches reach (a class: the gather policy keys a weak map on it)."""

    def __init__(self, optimizer, module):
        self.optimizer, self.module = optimizer, module


@pytest.fixture(autouse=True)
def one_rank(monkeypatch):
    """The stand-in's partition group is one rank (no process group runs in the unit tier)."""
    monkeypatch.setattr(gather_policy, "one_rank", lambda group: True)


def test_the_stand_in_passes_every_guard():
    for policy in (GATHERED, STREAMED):
        apply_gather_policy(_engine(), policy)
    apply_grad_reduce(_engine(), AFTER_BACKWARD)


@pytest.mark.parametrize("name", ["ds_persist", "ds_process_group", "ds_tensor", "ds_numel", "ds_shape", "ds_status",
                                  "ds_id"])
def test_the_gathered_policy_refuses_parameters_without_a_partition_mark(name):
    engine = _engine()
    delattr(engine.module.weight, name)
    with pytest.raises(DeepSpeedInternalError, match=f"has no Parameter.{name}, which train.zero3_gather=gathered"):
        apply_gather_policy(engine, GATHERED)


def test_the_gathered_policy_refuses_a_deepspeed_without_its_parameter_status(monkeypatch):
    from deepspeed.runtime.zero import partition_parameters

    monkeypatch.delattr(partition_parameters, "ZeroParamStatus")
    with pytest.raises(DeepSpeedInternalError, match="has no module.ZeroParamStatus, which train.zero3_gather"):
        apply_gather_policy(_engine(), GATHERED)


GATHER_INTERNALS = {GATHERED: ["parameter_offload", "forward_hooks", "backward_hooks"],
                    STREAMED: ["parameter_offload"]}
GRAD_INTERNALS = ["_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads", "_grad_acc_hooks", "leaf_parameters",
                  "fp16_groups", "independent_gradient_partition_epilogue", "partition_grads",
                  "get_param_comm_dtype", "reduce_bucket_size", "get_grad_norm_direct", "_get_param_partition_group",
                  "_autoep_expert_parallel_group", "model_parallel_group", "model_parallel_rank",
                  "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", "micro_step_id", "offload_optimizer",
                  "_offload_boundary_param_ids", "dtype"] + [name for name, _, _ in OTHER_PATHS]


@pytest.mark.parametrize("policy, name", [(p, n) for p, names in GATHER_INTERNALS.items() for n in names])
def test_a_gather_policy_refuses_a_deepspeed_without_an_internal(policy, name):
    where = "optimizer" if name == "parameter_offload" else "offload"
    engine = _engine(**({"optimizer_attrs": [name]} if where == "optimizer" else {"offload_attrs": [name]}))
    with pytest.raises(DeepSpeedInternalError, match=f"has no .*{name}, which train.zero3_gather={policy}"):
        apply_gather_policy(engine, policy)


@pytest.mark.parametrize("policy, method", [(GATHERED, "_remove_module_hooks"), (GATHERED, "partition_all_parameters"),
                                            (STREAMED, "post_sub_module_backward_function")])
def test_a_gather_policy_refuses_an_offload_without_its_method(policy, method, monkeypatch):
    monkeypatch.delattr(Offload, method)
    with pytest.raises(DeepSpeedInternalError, match=f"has no Offload.{method}"):
        apply_gather_policy(_engine(), policy)


def test_the_policies_refuse_parameters_or_modules_without_deepspeeds_marks():
    engine = _engine()
    del engine.module.weight.ds_active_sub_modules
    with pytest.raises(DeepSpeedInternalError, match="ds_active_sub_modules"):
        apply_gather_policy(engine, GATHERED)
    engine = _engine()
    del engine.module.post_bwd_fn
    with pytest.raises(DeepSpeedInternalError, match="post_bwd_fn"):
        apply_gather_policy(engine, STREAMED)


@pytest.mark.parametrize("name", GRAD_INTERNALS)
def test_the_after_backward_reduction_refuses_a_deepspeed_without_an_internal(name):
    with pytest.raises(DeepSpeedInternalError, match=f"has no .*{name}, which train.grad_reduce=after_backward"):
        apply_grad_reduce(_engine(optimizer_attrs=[name]), AFTER_BACKWARD)


@pytest.mark.parametrize("name", ["ds_id", "ds_numel"])
def test_the_after_backward_reduction_refuses_parameters_without_a_field_it_reads(name):
    engine = _engine()
    delattr(engine.module.weight, name)
    with pytest.raises(DeepSpeedInternalError, match=f"has no Parameter.{name}, which train.grad_reduce=after_back"):
        apply_grad_reduce(engine, AFTER_BACKWARD)


@pytest.mark.parametrize("module, name", [("deepspeed.comm.pg_utils", "is_parallel"),
                                          ("deepspeed.runtime.zero.utils", "get_norm_dtype")])
def test_the_after_backward_reduction_refuses_a_deepspeed_without_a_helper(module, name, monkeypatch):
    import importlib

    monkeypatch.delattr(importlib.import_module(module), name)
    with pytest.raises(DeepSpeedInternalError, match=f"has no module.{name}, which train.grad_reduce=after_backward"):
        apply_grad_reduce(_engine(), AFTER_BACKWARD)


def test_a_deepspeed_module_that_is_not_there_is_refused_by_name():
    with pytest.raises(DeepSpeedInternalError, match="has no module deepspeed.no_such_module, which the test needs"):
        deepspeed_internals.internal_of("deepspeed.no_such_module", "anything", "the test")


def test_the_after_backward_reduction_refuses_a_deepspeed_without_its_reduce_scatter(monkeypatch):
    from deepspeed.runtime.zero import stage3

    monkeypatch.delattr(stage3, "reduce_scatter_coalesced")
    with pytest.raises(DeepSpeedInternalError, match="has no module.reduce_scatter_coalesced, which train.grad_red"):
        apply_grad_reduce(_engine(), AFTER_BACKWARD)


@pytest.mark.parametrize("name, kept, what", OTHER_PATHS)
def test_the_after_backward_reduction_refuses_the_paths_it_does_not_reproduce(name, kept, what):
    engine = _engine()
    setattr(engine.optimizer, name, object() if kept is None else not kept)
    with pytest.raises(DeepSpeedInternalError, match="set train.grad_reduce=overlapped"):
        apply_grad_reduce(engine, AFTER_BACKWARD)


def test_an_untested_deepspeed_version_is_refused_or_warned_about(monkeypatch, capsys):
    check_version()                                                       # the pinned one passes
    monkeypatch.setattr(deepspeed_internals, "installed_version", lambda: "0.20.1")
    with pytest.raises(DeepSpeedInternalError, match="0.20.1 is not a version .* train.deepspeed_check=warn"):
        apply_gather_policy(_engine(), GATHERED)
    apply_gather_policy(_engine(), GATHERED, check="warn")
    assert "warning: DeepSpeed 0.20.1" in capsys.readouterr().out


def test_the_real_classes_carry_the_methods_the_guards_name():
    from deepspeed.runtime.zero import stage3
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    assert deepspeed_internals.installed_version() in deepspeed_internals.TESTED_VERSIONS
    for name in ("_remove_module_hooks", "post_sub_module_backward_function", "partition_all_parameters"):
        assert callable(getattr(DeepSpeedZeRoOffload, name)), name
    for name in ("_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads", "partition_grads", "get_param_comm_dtype",
                 "independent_gradient_partition_epilogue", "get_grad_norm_direct", "_get_param_partition_group",
                 "_autoep_expert_parallel_group"):
        assert callable(getattr(Stage3, name)), name
    assert callable(stage3.reduce_scatter_coalesced)
