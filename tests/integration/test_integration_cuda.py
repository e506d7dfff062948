# SPDX-License-Identifier: Apache-2.0
"""GPU-only checks (skipped on machines without CUDA, such as CI here): no host-device sync in any
criterion's forward/backward under ``torch.cuda.set_sync_debug_mode("error")``, fp16/bf16 autocast."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import losskit
from losskit.registry import FIRST_PARTY
from losskit.schema import required_examples

#: Fields a criterion cannot be built without (they have no default), for the ones that have any.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
#: Criteria whose issue allows host syncs per step, and how many: detr_loss solves its Hungarian matching
#: on the host (one read-back of every output set's costs; the copy of the matches back is pinned).
HOST_SYNCS = {"detr_loss": 2}


def _required(name: str) -> dict[str, Any]:
    """The example values of the criterion's required fields (for building it without a config file)."""
    return required_examples(losskit.get_registry().get(name).cls.Config)


@cuda
@pytest.mark.parametrize("name", sorted(FIRST_PARTY))
def test_no_host_sync_on_cuda(name: str) -> None:
    loss = losskit.build_losses([{"criterion": name, **_required(name)}], device="cuda")
    out, target = loss[name].example(4, device="cuda", generator=torch.Generator().manual_seed(0))
    loss(out, target)  # warm-up: lazy init may sync once
    torch.cuda.synchronize()
    allowed = HOST_SYNCS.get(name, 0)
    torch.cuda.set_sync_debug_mode("warn" if allowed else "error")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = loss(out, target)
            result.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= allowed, [str(w.message) for w in syncs]
    assert torch.isfinite(result.total).item()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(FIRST_PARTY))
def test_autocast_on_cuda(name: str, dtype: torch.dtype) -> None:
    loss = losskit.build_losses([{"criterion": name, **_required(name)}], device="cuda")
    out, target = loss[name].example(4, device="cuda", generator=torch.Generator().manual_seed(0))
    reference = loss(out, target).total
    with torch.autocast("cuda", dtype=dtype):
        value = loss(out, target).total
    value.backward()
    assert torch.isfinite(value).item()
    torch.testing.assert_close(value.float(), reference.float(), rtol=5e-2, atol=5e-2)
