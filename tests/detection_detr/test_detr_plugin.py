# SPDX-License-Identifier: Apache-2.0
"""Entry-point discovery, NetsPresso's config block, nested config errors, defaults and the example."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
from pathlib import Path

import pytest
import torch

import losskit
from losskit.schema import describe_fields
from losskit.testing import assert_defaults_match
from losskit_detection_detr import (
    CostWeights,
    DetrLoss,
    DetrLossConfig,
    LossWeights,
    MatcherConfig,
    detr_loss,
    detr_match,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detection-detr.yaml"
TERMS = ("vfl", "bbox", "giou", "aux_vfl", "aux_bbox", "aux_giou", "dn_vfl", "dn_bbox", "dn_giou")
BLOCK = """\
- criterion: detr_loss
  weight: ~
  weight_dict: {loss_vfl: 1, loss_bbox: 5, loss_giou: 2}
  losses: [vfl, boxes]
  alpha: 0.75
  gamma: 2.0
  matcher:
    type: HungarianMatcher
    weight_dict: {cost_class: 2, cost_bbox: 5, cost_giou: 2}
    alpha: 0.25
    gamma: 2.0
    use_focal_loss: true
"""


def test_discovered_through_the_entry_point() -> None:
    info = losskit.Registry().get("detr_loss")
    assert info.cls is DetrLoss
    assert info.distribution == "losskit-detection-detr"
    assert info.plugin == "detection_detr"
    eps = {ep.name: ep.value for ep in md.entry_points(group="losskit")}
    assert eps["detection_detr"] == "losskit_detection_detr.plugin"


def test_netspresso_block_loads_unchanged_and_equals_the_defaults() -> None:
    (entry,) = losskit.load_config(BLOCK).entries
    assert entry.config == DetrLoss.Config()
    assert entry.weight == 1.0
    (bare,) = losskit.load_config("- criterion: detr_loss").entries
    assert bare.config == entry.config


def test_config_file_builds_and_runs() -> None:
    loss = losskit.build_losses(CONFIG)
    crit = loss["detr_loss"]
    assert isinstance(crit, DetrLoss)
    out, target = crit.example(2, generator=torch.Generator().manual_seed(0))
    result = loss(out, target)
    assert set(result.parts) == {"detr_loss", "total", *(f"detr_loss/{t}" for t in TERMS)}
    assert set(result.diagnostics) == {f"detr_loss/{d}" for d in DetrLoss.diagnostics}
    result.total.backward()
    assert torch.isfinite(out["pred"].grad).all() and out["pred"].grad.abs().sum() > 0


def one_problem(text: str) -> str:
    with pytest.raises(losskit.ConfigError) as error:
        losskit.load_config(text)
    (problem,) = error.value.problems
    return f"{problem.path}: {problem.message}"


def test_nested_errors_are_located() -> None:
    text = BLOCK.replace("cost_class: 2", "cost_clas: 2")
    assert one_problem(text) == (
        "[0].matcher.weight_dict.cost_clas: unknown key 'cost_clas'; did you mean 'cost_class'? "
        "(valid keys: cost_class, cost_bbox, cost_giou)"
    )
    assert one_problem(BLOCK.replace("type: HungarianMatcher", "type: torch.nn.Linear")) == (
        "[0].matcher.type: got 'torch.nn.Linear' (a string); allowed: 'HungarianMatcher'"
    )
    assert one_problem(BLOCK.replace("loss_giou: 2}", "loss_gio: 2}")).startswith(
        "[0].weight_dict.loss_gio: unknown key 'loss_gio'; did you mean 'loss_giou'?"
    )
    assert one_problem(BLOCK.replace("[vfl, boxes]", "[vfl, box]")).startswith(
        "[0].losses: item [1]: got 'box'"
    )
    zero = "{cost_class: 0, cost_bbox: 0, cost_giou: 0}"
    assert one_problem(BLOCK.replace("{cost_class: 2, cost_bbox: 5, cost_giou: 2}", zero)) == (
        "[0].matcher.weight_dict: all three costs are 0; at least one must be > 0"
    )
    assert "cannot be combined" in one_problem(BLOCK.replace("[vfl, boxes]", "[vfl, labels]"))
    assert "once" in one_problem(BLOCK.replace("[vfl, boxes]", "[boxes, boxes]"))


def test_defaults_are_the_references() -> None:
    cfg = DetrLoss().config
    assert cfg.weight_dict == LossWeights(1.0, 5.0, 2.0, 1.0, 1.0)
    assert cfg.losses == ("vfl", "boxes") and (cfg.alpha, cfg.gamma, cfg.eos_coef) == (0.75, 2.0, 0.1)
    assert cfg.matcher == MatcherConfig("HungarianMatcher", CostWeights(2.0, 5.0, 2.0), 0.25, 2.0, True, 1e-8)
    names = [f.name for f in describe_fields(DetrLoss.Config)]
    assert "matcher.weight_dict.cost_class" in names and "weight_dict.loss_vfl" in names
    assert all(f.doc for f in describe_fields(DetrLoss.Config))
    assert [n for n in names if "." not in n] == [f.name for f in dataclasses.fields(DetrLoss.Config)]


def test_functional_defaults_come_from_the_config() -> None:
    assert_defaults_match(detr_loss, DetrLossConfig)
    assert_defaults_match(detr_match, DetrLossConfig)
    out, target = DetrLoss().example(2)
    got, want = detr_loss(out, target, alpha=0.5), DetrLoss(alpha=0.5)(out, target)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert detr_match(out, target)["dn"] is not None


def test_term_names_follow_the_losses() -> None:
    assert DetrLoss().term_names() == TERMS == DetrLoss.terms
    assert DetrLoss(losses=["labels"]).term_names() == ("labels", "aux_labels", "dn_labels")
    focal = DetrLoss(losses=["boxes", "focal"]).term_names()
    assert focal[:3] == ("bbox", "giou", "focal") and len(focal) == 9


def test_example_is_realistic_seeded_and_fast() -> None:
    crit = DetrLoss()
    out, target = crit.example(3, generator=torch.Generator().manual_seed(1))
    again, _ = crit.example(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out["pred"], again["pred"])
    assert len(out["aux_pred"]) == 3 and len(out["dn_aux_pred"]) == 3  # 2 decoder layers + encoder; 3 dn
    meta = out["dn_meta"]
    counts = [len(g["labels"]) for g in target["gt"]]
    assert [len(p) for p in meta["dn_positive_idx"]] == [n * meta["dn_num_group"] for n in counts]
    assert meta["dn_num_split"] == [out["dn_aux_pred"][0]["pred_logits"].shape[1], 20]
    terms = crit(out, target)
    assert all(torch.isfinite(v) for v in terms.values())
    assert float(terms.diagnostics["dn_groups"]) == meta["dn_num_group"]
    labels = DetrLoss(losses=["labels", "boxes"]).example(2)
    assert labels[0]["pred"].shape[-1] == 4 + 5 and labels[1]["num_classes"] == 4


def test_match_returns_sorted_int64_pairs_per_set() -> None:
    crit = DetrLoss()
    out, target = crit.example(2, generator=torch.Generator().manual_seed(2))
    m = crit.match(out, target)
    assert set(m) == {"main", "aux", "dn"} and len(m["aux"]) == len(out["aux_pred"])
    for q, g in [*m["main"], *(p for s in m["aux"] for p in s), *m["dn"]]:
        assert q.dtype == g.dtype == torch.int64 and q.shape == g.shape
        assert torch.equal(q, q.sort().values)
    for (q, g), gt in zip(m["main"], target["gt"]):
        assert len(q) == min(len(gt["labels"]), 20) and len(set(g.tolist())) == len(g)


def test_netspresso_block_from_omegaconf() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"model": {"losses": __import__("yaml").safe_load(BLOCK)}})
    (entry,) = losskit.load_config(cfg).entries
    assert entry.config == DetrLoss.Config()
