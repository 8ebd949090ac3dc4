"""The quantized gate at the embedded model's shape: it passes the right programs (the 8da4w bundle
as written, and the plan in eager rounded another way) and refuses every wrong one, each for the
reason that should catch it. scripts/gate_mutants.py builds the mutants; at the 0.8B shape it is run
by hand (docs/parity.md has that table)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gate_mutants.py"


@pytest.fixture(scope="module")
def rows(embedded_bundle) -> dict:
    spec = importlib.util.spec_from_file_location("gate_mutants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {row["mutant"]: row for row in module.measure_all(embedded_bundle("executorch", "8da4w"))}


def test_right_programs_pass(rows):
    for name, row in rows.items():
        if row["expect"] == "pass":
            assert row["passed"] and not row["weights_differ"], (name, row)


def test_every_weight_mutant_is_named_by_the_weight_check(rows):
    weight_rows = {name: row for name, row in rows.items() if row["kind"] == "artifact" and row["expect"] == "refuse"}
    assert len(weight_rows) == 4
    for name, row in weight_rows.items():
        assert not row["passed"] and len(row["weights_differ"]) == 1, (name, row)


def test_every_structural_mutant_fails_the_numeric_gate(rows):
    structural = {name: row for name, row in rows.items() if row["kind"] == "eager" and row["expect"] == "refuse"}
    assert len(structural) == 5
    for name, row in structural.items():
        numeric = (row["relative_diff"] > row["max_relative_diff"] or row["top1_agreement"] < row["min_top1"]
                   or row["mean_kl"] > row["max_mean_kl"] or row["worst_positions_kl"] > row["max_worst_positions_kl"])
        assert not row["passed"] and (numeric or row["reset_max_abs_diff"] > row["reset_allowed"]), (name, row)
