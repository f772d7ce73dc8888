import pytest

from kd_keras.config import build_config
from kd_keras.errors import KDError
from kd_keras.sweep import cell_name, parse_grid, run_sweep


def test_parse_grid_types_values():
    grid = parse_grid(["distill.temperature=1,2.5", "distill.mode=soft,hard"])
    assert grid == {"distill.temperature": [1, 2.5], "distill.mode": ["soft", "hard"]}
    assert cell_name({"distill.temperature": 2, "distill.beta": 0}) == "temperature=2_beta=0"
    with pytest.raises(KDError, match="section.key=v1,v2"):
        parse_grid(["temperature"])


@pytest.mark.slow
def test_sweep_runs_grid_and_skips_finished_cells(tiny_npz, tmp_path, capsys):
    raw = {
        "run": {"name": "s", "output_dir": str(tmp_path)},
        "data": {"path": str(tiny_npz), "image_size": 32, "batch_size": 16},
        "train": {"epochs": 1, "verbose": 0},
        "eval": {"seed_subset": False},
    }
    base = build_config(raw, tmp_path)
    grid = parse_grid(["distill.temperature=2", "distill.alpha=0.5", "distill.beta=0,1"])
    result = run_sweep(raw, tmp_path, base, grid, seeds=1)
    root = tmp_path / "s_sweep"
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["teacher", "student_scratch"] and len(names) == 4
    for f in ("results.csv", "results.md", "ablation.md", "heatmap.png"):
        assert (root / f).is_file(), f
    ablation = (root / "ablation.md").read_text()
    assert "logits only" in ablation and "logits + features" in ablation
    reports = sorted(root.rglob("report.json"))
    stamps = [p.stat().st_mtime_ns for p in reports]
    capsys.readouterr()

    run_sweep(raw, tmp_path, base, grid, seeds=1)
    assert [p.stat().st_mtime_ns for p in reports] == stamps
    assert capsys.readouterr().out.count("skip (finished)") == len(reports)
    with pytest.raises(KDError, match="distill.alpha"):
        run_sweep(raw, tmp_path, base, parse_grid(["distill.alpha=2"]), seeds=1)
