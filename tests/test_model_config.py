"""ModelConfig's validation: a sparse optimizer this machine cannot run fails in one line, up front."""

import pytest
import torch

from dimstream.models.arm import Arm, ArmSpec
from dimstream.models.config import ModelConfig
from tests.helpers import tiny_schema

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="FBGEMM's CUDA kernels have row-wise Adam")


@cpu_only
def test_rowwise_adam_fails_at_validation_on_a_cpu():
    with pytest.raises(ValueError, match="'rowwise_adam' needs CUDA"):
        ModelConfig("deepfm", sparse_optimizer="rowwise_adam")
    with pytest.raises(ValueError, match="'rowwise_adam' needs CUDA"):  # a checkpoint's config too
        ModelConfig.from_dict(ModelConfig().to_dict() | {"sparse_optimizer": "rowwise_adam"})


@cpu_only
def test_without_the_check_rowwise_adam_fails_deep_in_the_arm():
    """Why the check exists: past validation, FBGEMM's CPU kernel rejects the optimizer with a
    bare AssertionError while DMP builds the tables. Should a new FBGEMM take it, this fails and
    the check above can go."""
    cfg = ModelConfig("fm", batch_size=8)
    cfg.sparse_optimizer = "rowwise_adam"  # set after __post_init__ has run
    s = tiny_schema()
    with pytest.raises(AssertionError, match="not supported in CPU mode"):
        Arm(ArmSpec("control", {f: 4 for f in s.feature_names}), s.num_embeddings, {"tags"}, cfg)


@pytest.mark.parametrize("name", ["adagrad", "rowwise_adagrad", "sgd"])
def test_cpu_optimizers_pass(name):
    assert ModelConfig(sparse_optimizer=name).sparse_optimizer == name
