"""Every shipped recipe is a valid config for its method and model family; the benchmark query counting is exact."""
import importlib.util
import sys
from pathlib import Path

import pytest

from genft.config import ConfigError
from genft.loading import load_config
from genft.methods import get_method
from genft.models import check_method_fits_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "scripts" / "recipes").glob("*.yaml")) + sorted((ROOT / "scripts" / "recipes" / "real").glob("*.yaml"))


def test_there_are_recipes_for_each_flow_issue_method():
    names = {p.stem for p in RECIPES}
    for needed in ["dpok_toyworld", "adjoint_matching_toyworld", "adjoint_matching_toyworld_flow", "fail_pd_toyworld_flow",
                   "fail_pg_toyworld_flow", "dpok_toyworld_mirror"]:
        assert needed in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_fits_its_model(recipe):
    try:
        config = load_config(recipe)
    except ConfigError as e:  # real-model recipes point at the user's own expert images
        assert "expert_data" in str(e) and recipe.parent.name == "real"
        config = load_config(recipe, ["expert_data=toyworld:thin"])
    method = get_method(config.method)
    check_method_fits_model(method, config.model)
    assert config.output_dir.startswith("genft_runs/")


def _load_runs_module():
    spec = importlib.util.spec_from_file_location("bench_runs", ROOT / "scripts" / "bench" / "_runs.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(module)
    return module


def test_queries_to_gain_reads_the_held_out_curve_from_the_run_log():
    runs = _load_runs_module()
    records = [{"round": 0, "event": "eval", "tag": "before", "eval/r": 1.0}, {"round": 1, "reward_mean": 5.0},
               {"round": 2, "event": "eval", "tag": "round_00002", "eval/r": 1.02},
               {"round": 4, "event": "eval", "tag": "round_00004", "eval/r": 1.06},
               {"round": 6, "event": "eval", "tag": "after", "eval/other": 9.0}]
    curve = runs.eval_curve(records, "r")
    assert curve == [(0, 1.0), (2, 1.02), (4, 1.06)]
    assert runs.queries_to_gain(curve, 0.05, queries_per_round=32) == 128
    assert runs.queries_to_gain(curve, 0.01, queries_per_round=32) == 64
    assert runs.queries_to_gain(curve, 0.1, queries_per_round=32) is None
