"""Tables and plots from real run folders: runs trained by the engine, then read by fsam.report and scripts/."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fsam.engine import run
from fsam.report import load_metrics, load_runs, paper_layout, reference_table, settings_table, summarise
from fsam.runfolder import RunFolder, RunLock
from reportgen import run_script, write_run
from wandb_records import read_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, cifar_root):
    """Two methods x two seeds, finished; SGD at another learning rate, one seed; one unfinished run (config and
    metrics, no summary)."""
    from conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("runs")
    for folder, method, lr, seeds in (("sgd", "sgd", 0.05, (1, 2)), ("fsam", "fsam", 0.05, (1, 2)),
                                      ("sgd_lr0.1", "sgd", 0.1, (1,))):
        for seed in seeds:
            run({
                "run_dir": str(root / folder / f"seed{seed}"),
                "dataset": {"name": "cifar10", "root": str(cifar_root), "download": False, "num_workers": 0},
                "model": TINY_MODEL,
                "optimizer": {"name": method, "lr": lr},
                "trainer": {"epochs": 2, "batch_size": 16, "device": "cpu", "amp": "off", "seed": seed},
            })
    unfinished = root / "sam" / "seed1"
    unfinished.mkdir(parents=True)
    config = yaml.safe_load((root / "fsam" / "seed1" / "config.yaml").read_text())
    config.pop("identity")  # F-SAM's identity would not be SAM's: read as a folder from before identities
    config["optimizer"]["name"] = "sam"
    (unfinished / "config.yaml").write_text(yaml.safe_dump(config))
    first_epoch = (root / "fsam" / "seed1" / "metrics.jsonl").read_text().splitlines()[0]
    (unfinished / "metrics.jsonl").write_text(first_epoch + '\n{"epoch": 2, "train_lo')  # killed mid-line
    return root


def summaries(root: Path) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for path in root.rglob("summary.json"):
        record = json.loads(path.read_text())
        found.setdefault(record["setting"], []).append(record["best_top1"])
    return found


def test_runs_are_read_with_their_settings_and_status(runs_root):
    runs = load_runs(runs_root)
    assert len(runs) == 6
    assert sorted(runs["status"]) == ["finished"] * 5 + ["unfinished"]
    finished = runs[runs["status"] == "finished"]
    assert sorted(zip(finished["optimizer"], finished["seed"])) == [
        ("fsam", 1), ("fsam", 2), ("sgd", 1), ("sgd", 1), ("sgd", 2)
    ]
    # the network as built, with its size: a depth-8 PyramidNet is not PyramidNet-110
    assert set(finished["dataset"]) == {"cifar10"} and set(finished["model"]) == {"pyramidnet8"}
    assert finished["model_parameters"].nunique() == 1
    assert 1_000 < finished["model_parameters"].iloc[0] < 100_000


def test_seeds_of_a_trained_setting_are_aggregated_into_mean_std_and_count(runs_root):
    table = summarise(load_runs(runs_root))
    # one row per setting: the two SGD learning rates are never averaged as if they were seeds
    assert sorted(zip(table["optimizer"], table["lr"], table["n"])) == [
        ("fsam", 0.05, 2), ("sam", 0.05, 0), ("sgd", 0.05, 2), ("sgd", 0.1, 1)
    ]
    for setting, values in summaries(runs_root).items():
        row = table[table["setting"] == setting].iloc[0]
        mean = sum(values) / len(values)
        assert row["n"] == len(values) and row["best_top1_mean"] == pytest.approx(mean)
        if len(values) == 2:
            assert row["best_top1_std"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 1) ** 0.5)
        else:
            assert math.isnan(row["best_top1_std"])  # one seed has no spread
    assert table[table["optimizer"] == "sam"].iloc[0]["unfinished"] == 1  # counted beside its setting


def test_a_metrics_line_cut_by_a_kill_is_skipped(runs_root):
    metrics = load_metrics(runs_root / "sam" / "seed1")
    assert list(metrics["epoch"]) == [1]


def test_the_reference_table_keeps_sources_and_marks_unavailable_cells():
    reference = reference_table(REPO / "results" / "known-results.csv")
    assert (reference["source"] != "").all()
    unavailable = reference[reference["value"] == "not available"]
    assert len(unavailable) == 18 and (unavailable["note"].str.contains("never filled by hand")).all()


def test_make_tables_writes_every_format_and_refuses_a_missing_folder(runs_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tables"
    assert run_script(monkeypatch, "make_tables", runs_root, "--out-dir", out) == 0, capsys.readouterr().err
    expected = {"tables.md", "settings.md", "settings.csv", "settings.tex"} | {
        f"paper_{metric}.{suffix}" for metric in ("best_top1", "final_top1") for suffix in ("md", "csv", "tex")
    }
    assert {path.name for path in out.iterdir()} == expected
    text = (out / "tables.md").read_text()
    assert "## Paper layout" in text and "5 finished" in text and "1 unfinished" in text
    assert "('cifar10'" not in text  # row labels are columns, not tuples
    # the real command line: its exit status and message, not only main()'s
    missing = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tables.py"), str(tmp_path / "nowhere"), "--out-dir", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: no run folder")
    assert (out / "tables.md").read_text() == text  # the good table is untouched


def hand_edited(root: Path) -> tuple[Path, str]:
    """SGD with two seeds in identity-named folders; seed 2's config edited afterwards (lr 0.1 -> 0.5). Returns
    the edited folder and its problem."""
    for seed, top1 in ((1, [88.0, 90.0]), (2, [92.0, 94.0])):
        folder = write_run(root, f"scratch/seed{seed}", seed=seed, top1=top1)
        name = json.loads((folder / "summary.json").read_text())["setting"]
        (root / name).mkdir(exist_ok=True)
        folder = folder.rename(root / name / f"seed{seed}")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["optimizer"]["lr"] = 0.5
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder, RunFolder(folder).problem()


def test_make_tables_lists_damaged_folders_with_the_reason_and_tabulates_none_of_them(tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    edited, problem = hand_edited(root)
    cut = write_run(root, "fsam/seed1", method="fsam", top1=[50.0, 60.0])
    (cut / "summary.json").write_text('{"best_top1": 9')
    out = tmp_path / "tables"
    assert run_script(monkeypatch, "make_tables", root, "--out-dir", out) == 0
    printed = capsys.readouterr().out
    listing = (f"- {edited}: {problem}\n"
               f"- {cut}: summary.json is not a JSON object (cut short or edited)\n")
    assert problem.startswith("config.yaml computes setting ") and listing in printed
    assert listing in (out / "tables.md").read_text() and "Runs: 2 damaged, 1 finished." in printed
    settings = pd.read_csv(out / "settings.csv")
    assert list(zip(settings["optimizer"], settings["lr"], settings["n"])) == [("sgd", 0.1, 1)]  # no lr 0.5, no F-SAM
    assert settings["final_top1_mean"].tolist() == [90.0]


def test_plot_lists_damaged_folders_and_draws_none_of_them(tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    edited, problem = hand_edited(root)
    measured = [[{"step": 5, "ema_cosine": 0.9, "ema_relative_error": 0.45}], []]
    cut = write_run(root, "fsam/seed1", method="fsam", analysis=measured)
    (cut / "metrics.jsonl").write_text((cut / "metrics.jsonl").read_text()[:-5])
    assert run_script(monkeypatch, "plot", root, "--out-dir", tmp_path / "figures") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [f"damaged: {edited}: {problem}",
                           f"damaged: {cut}: metrics.jsonl line 2 is not JSON (cut short or edited)"]
    assert any(line.startswith("not drawn (F-SAM's EMA against the full gradient): needs an F-SAM run trained with")
               for line in printed)
    assert sorted(path.name for path in (tmp_path / "figures").iterdir()) == ["curves_CIFAR-10_resnet18.pdf",
                                                                              "curves_CIFAR-10_resnet18.png"]


# ------------------------------------------------------------------ generated run folders, expected by hand


@pytest.fixture
def generated(tmp_path):
    """SGD at two learning rates (one with two seeds), F-SAM with two seeds and a diverged third, SAM unfinished
    and running. Best / final top-1 per run are chosen so the expected cells can be written by hand."""
    root = tmp_path / "runs"
    write_run(root, "sgd-a/seed1", seed=1, top1=[88.0, 90.0])
    write_run(root, "sgd-a/seed2", seed=2, top1=[92.0, 91.0])
    write_run(root, "sgd-b/seed1", lr=0.05, top1=[70.0, 96.0])  # the best SGD number, from one seed
    write_run(root, "fsam/seed1", method="fsam", seed=1, top1=[93.0, 92.0])
    write_run(root, "fsam/seed2", method="fsam", seed=2, top1=[95.0, 94.0])
    write_run(root, "fsam/seed3", method="fsam", seed=3, state="diverged")
    write_run(root, "sam/seed1", method="sam", seed=1, state="unfinished")
    running = write_run(root, "sam/seed2", method="sam", seed=2, state="unfinished")
    lock = RunLock(running)
    lock.acquire()  # a process trains it now
    yield root
    lock.release()


def test_the_per_setting_table_is_the_one_written_by_hand(generated):
    table = settings_table(summarise(load_runs(generated), seeds_expected=2))
    best, final = ("test top-1 at the best test epoch (%; diagnostic: chosen on the test set)",
                   "final-epoch test top-1 (%)")
    assert len(table) == 4  # two learning rates are two rows, never averaged
    by_setting = {(row["optimizer"], row["lr"]): row for _, row in table.iterrows()}
    assert by_setting[("sgd", 0.1)][best] == "91.00 ± 1.41 (n=2)"
    assert by_setting[("sgd", 0.1)][final] == "90.50 ± 0.71 (n=2)"
    assert by_setting[("sgd", 0.05)][best] == "96.00 (n=1) †"  # one seed: no ±; fewer than asked: flagged
    assert by_setting[("fsam", 0.1)][best] == "94.00 ± 1.41 (n=2; 1 diverged)"  # counted, not averaged
    assert by_setting[("sam", 0.1)][best] == "— (n=0; 1 unfinished; 1 running) †"
    # only the hyperparameters a method reads: SGD has no rho, sigma or lambda; SAM no sigma or lambda
    assert by_setting[("sgd", 0.1)]["rho"] == "" and by_setting[("sam", 0.1)]["lmbda"] == ""
    assert by_setting[("fsam", 0.1)]["lmbda"] == 0.6 and by_setting[("sam", 0.1)]["rho"] == 0.1  # SAM's own radius


def test_the_paper_layout_shows_every_setting_or_says_which_it_chose(generated):
    known = pd.DataFrame([{"source": "test-source", "dataset": "cifar10", "model": "resnet18", "optimizer": "sgd",
                           "rho": None, "lambda": None, "sigma": None, "epochs": 2, "batch": 128,
                           "metric": "top1_best", "value": 90.5, "seeds": 1, "note": ""}])
    layout = paper_layout(summarise(load_runs(generated)), "best_top1", known)
    row = layout.table.loc[("CIFAR-10", "resnet18")]
    assert list(layout.table.columns) == ["SGD", "SGD published", "SAM", "SAM published", "F-SAM", "F-SAM published"]
    assert row["SGD"] == "91.00 ± 1.41 (n=2)"  # the setting with more seeds, not the one that scored best
    assert row["SGD published"] == "90.50 [test-source], Δ +0.50"
    assert row["F-SAM published"] == "not available"
    (note,) = layout.notes
    assert note.startswith("CIFAR-10 / resnet18 / SGD: 2 settings; shown ") and "also run: cifar10-resnet18-sgd-" in note


def test_a_published_number_applies_only_to_the_setting_it_was_measured_with(generated):
    known = pd.DataFrame([{"source": "s", "dataset": "cifar10", "model": "resnet18", "optimizer": "sgd",
                           "rho": None, "lambda": None, "sigma": None, "epochs": 200, "batch": 128,
                           "metric": "top1_best", "value": 90.5, "seeds": 1, "note": ""}])
    layout = paper_layout(summarise(load_runs(generated)), "best_top1", known)
    assert layout.table.loc[("CIFAR-10", "resnet18"), "SGD published"] == "not available"  # 2 epochs, not 200


def test_make_tables_writes_numbers_to_csv_and_captions_to_the_readable_tables(generated, tmp_path, monkeypatch,
                                                                               capsys):
    out = tmp_path / "t"
    assert run_script(monkeypatch, "make_tables", generated, "--out-dir", out) == 0, capsys.readouterr().err
    layout = pd.read_csv(out / "paper_final_top1.csv")
    sgd = layout[layout["method"] == "SGD"].iloc[0]  # seeds 1 and 2 of lr 0.1 end at 90 and 91
    assert (sgd["mean"], sgd["std"], sgd["n"]) == (90.5, pytest.approx(0.5 ** 0.5), 2)
    fsam = layout[layout["method"] == "F-SAM"].iloc[0]
    assert (fsam["mean"], fsam["n"], fsam["diverged"]) == (93.0, 2, 1)
    settings = pd.read_csv(out / "settings.csv")
    for table in (layout, settings):
        numeric = [column for column in table if column.endswith(("mean", "std")) or column == "n"]
        assert numeric and all(pd.api.types.is_numeric_dtype(table[column]) for column in numeric)
    spread = "sample standard deviation over the finished seeds (n − 1 denominator"
    for name in ("settings.md", "paper_final_top1.md", "paper_best_top1.md"):
        first, blank, table = (out / name).read_text().split("\n")[:3]
        assert spread in first and blank == "" and table.startswith("| ")
    for name in ("settings.tex", "paper_final_top1.tex", "paper_best_top1.tex"):
        assert "sample standard deviation over the finished seeds (n $-$ 1 denominator" in (out / name).read_text()
    text = (out / "tables.md").read_text()
    # the headline first; the best test epoch last and named a diagnostic
    assert text.index("## Paper layout: final-epoch test top-1 (%)") < text.index(
        "## Paper layout: test top-1 at the best test epoch (%; diagnostic: chosen on the test set)")
    assert "- final-epoch test top-1 (%) (the headline): the last epoch's test top-1, no epoch is chosen." in text
    assert spread in text


def latex_rows(tex: str) -> list[str]:
    body = tex.split("\\midrule\n", 1)[1].split("\\bottomrule", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def test_the_latex_tables_are_booktabs_and_well_formed(generated, tmp_path, monkeypatch, capsys):
    assert run_script(monkeypatch, "make_tables", generated, "--out-dir", tmp_path / "t") == 0, capsys.readouterr().err
    for path in (tmp_path / "t").glob("*.tex"):
        tex = path.read_text()
        for command in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}", "\\end{tabular}"):
            assert tex.count(command) == 1, (path.name, command)
        columns = len(tex.split("\\begin{tabular}{", 1)[1].split("}", 1)[0])
        for line in latex_rows(tex):
            assert line.endswith("\\\\") and line.replace("\\&", "").count("&") == columns - 1, line
        text = tex.replace("\\%", "").replace("\\_", "").replace("\\&", "").replace("\\#", "")
        assert "%" not in text and "_" not in text.replace("\\label{tab:paper-best_top1}", "").replace(
            "\\label{tab:paper-final_top1}", "") and "±" not in tex
        assert tex.count("{") == tex.count("}")
        if shutil.which("pdflatex"):
            document = tmp_path / f"{path.stem}_doc.tex"
            document.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + tex
                                + "\\end{document}\n")
            compiled = subprocess.run(["pdflatex", "-interaction=nonstopmode", document.name], cwd=tmp_path,
                                      capture_output=True, text=True, timeout=120)
            assert compiled.returncode == 0, compiled.stdout[-2000:]


def test_make_tables_logs_the_tables_to_wandb_offline_with_their_numbers_as_numbers(generated, tmp_path, monkeypatch,
                                                                                    capsys):
    out = tmp_path / "t"
    status = run_script(monkeypatch, "make_tables", generated, "--out-dir", out, "--wandb", "--wandb-mode", "offline")
    assert status == 0, capsys.readouterr().err
    (run_folder,) = (out / "wandb").glob("offline-run-*")
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wandb: tables and charts logged offline to {run_folder}; upload with: wandb sync {run_folder}")
    record = read_run(run_folder)
    assert record["run"].job_type == "report"
    logged = record["history"][0]
    assert {key: value for key, value in logged.items() if key.endswith("/_type")} == {
        **{f"tables/{name}/_type": "table-file" for name in ("settings", "paper_final_top1", "paper_best_top1")},
        **{f"charts/{name}_table/_type": "table-file" for name in ("final_top1", "best_top1")},
        **{f"charts/{name}/_type": "image-file" for name in ("final_top1", "best_top1")}}
    table = json.loads((run_folder / "files" / logged["tables/settings/path"]).read_text())
    named = [dict(zip(table["columns"], row)) for row in table["data"]]
    rows = {(row["optimizer"], row["lr"]): row for row in named}
    sgd = rows[("sgd", 0.1)]  # the learning rate a number, not "0.1"
    assert (sgd["final-epoch test top-1 (%)"], sgd["final_top1_mean"], sgd["n"]) == ("90.50 ± 0.71 (n=2)", 90.5, 2)
    assert sgd["final_top1_std"] == pytest.approx(0.5 ** 0.5) and sgd["best_top1_mean"] == 91.0
    assert math.isnan(sgd["rho"]) and rows[("fsam", 0.1)]["rho"] == 0.2  # SGD reads no rho: empty, not ""
    assert (rows[("fsam", 0.1)]["n"], rows[("fsam", 0.1)]["diverged"]) == (2, 1)
    paper = json.loads((run_folder / "files" / logged["tables/paper_final_top1/path"]).read_text())
    cells = [dict(zip(paper["columns"], row)) for row in paper["data"]]
    assert [c["method"] for c in cells] == ["SGD", "SAM", "F-SAM"]
    assert (cells[0]["cell"], cells[0]["mean"], cells[0]["n"]) == ("90.50 ± 0.71 (n=2)", 90.5, 2)
    assert (cells[1]["cell"], cells[1]["n"], cells[1]["running"]) == ("— (n=0; 1 unfinished; 1 running)", 0, 1)
    assert math.isnan(cells[1]["mean"])
    assert (cells[2]["cell"], cells[2]["mean"], cells[2]["diverged"]) == ("93.00 ± 1.41 (n=2; 1 diverged)", 93.0, 1)


def test_the_wandb_charts_show_every_setting_under_its_own_label_with_its_unrounded_mean_and_spread(
        tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    finals = {(0.3, 0.5): [90.0, 90.5], (0.3, 1.5): [91.3], (0.9, 0.5): [92.7], (0.9, 1.5): [93.1]}
    for (lmbda, sigma), values in finals.items():
        for seed, final in enumerate(values, start=1):
            write_run(root, f"fsam-{lmbda}-{sigma}/seed{seed}", method="fsam", lmbda=lmbda, sigma=sigma, seed=seed,
                      top1=[50.0, final])
    # two settings that differ only in the SGD base's momentum, which no label names
    write_run(root, "sgd-a/seed1", top1=[50.0, 80.4])
    write_run(root, "sgd-b/seed1", top1=[50.0, 81.6], optimizer={"momentum": 0.8})
    out = tmp_path / "t"
    assert run_script(monkeypatch, "make_tables", root, "--out-dir", out, "--wandb", "--wandb-mode", "offline") == 0
    (run_folder,) = (out / "wandb").glob("offline-run-*")
    logged = read_run(run_folder)["history"][0]
    chart = json.loads((run_folder / "files" / logged["charts/final_top1_table/path"]).read_text())
    points = [dict(zip(chart["columns"], row)) for row in chart["data"]]
    digests = {point["mean"]: point["setting"][-12:] for point in points if point["method"] == "sgd"}
    assert [(point["label"], point["mean"], point["n"]) for point in points] == [
        *sorted([(f"CIFAR-10 / resnet18 / SGD [{digests[80.4]}]", 80.4, 1),
                 (f"CIFAR-10 / resnet18 / SGD [{digests[81.6]}]", 81.6, 1)]),
        ("CIFAR-10 / resnet18 / F-SAM (σ 0.5, λ 0.3)", 90.25, 2),  # never rounded to a whole percent
        ("CIFAR-10 / resnet18 / F-SAM (σ 0.5, λ 0.9)", 92.7, 1),
        ("CIFAR-10 / resnet18 / F-SAM (σ 1.5, λ 0.3)", 91.3, 1),
        ("CIFAR-10 / resnet18 / F-SAM (σ 1.5, λ 0.9)", 93.1, 1)]
    assert points[2]["std"] == pytest.approx(0.5 ** 0.5 / 2) and all(math.isnan(p["std"]) for p in points[3:])
    image = run_folder / "files" / logged["charts/final_top1/path"]
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backfill_sends_a_finished_run_to_wandb_as_the_run_it_was(generated, monkeypatch, capsys):
    folder = generated / "sgd-a" / "seed1"
    assert run_script(monkeypatch, "wandb_backfill", generated, "--mode", "offline") == 0, capsys.readouterr().err
    assert "5 of 5 finished runs sent" in capsys.readouterr().out
    (run_folder,) = (folder / "wandb").glob("offline-run-*")
    record = read_run(run_folder)
    setting = json.loads((folder / "summary.json").read_text())["setting"]
    assert record["run"].display_name == f"{setting}-seed1" and record["run"].run_group == setting
    epochs = [row for row in record["history"] if "test/top1" in row]
    assert [row["test/top1"] for row in epochs] == [88.0, 90.0] and [row["_step"] for row in epochs] == [10, 20]
    assert record["summary"]["best_top1"] == 90.0 and record["summary"]["model"]["parameters"] == 11_173_962
    assert not list((generated / "sam" / "seed1").glob("wandb"))  # unfinished runs are not sent


def test_every_figure_is_written_as_png_and_pdf(tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    for method in ("sgd", "sam", "fsam"):
        for seed in (1, 2):
            write_run(root, f"{method}/seed{seed}", method=method, seed=seed, top1=[40.0 + seed, 50.0 + seed, 55.0])
        for noise in (0.2, 0.4):
            write_run(root, f"{method}-noise{noise}/seed1", method=method, noise=noise, top1=[30.0, 40.0 - 10 * noise])
    for lmbda in (0.3, 0.9):
        for sigma in (0.5, 1.5):
            write_run(root, f"fsam-{lmbda}-{sigma}/seed1", method="fsam", lmbda=lmbda, sigma=sigma,
                      top1=[50.0, 50.0 + 10 * lmbda + sigma])
    out = tmp_path / "figures"
    assert run_script(monkeypatch, "plot", root, "--out-dir", out) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    stems = {"curves_CIFAR-10_resnet18", "curves_CIFAR-10-symmetric-20-noise_resnet18",
             "curves_CIFAR-10-symmetric-40-noise_resnet18", "heatmap_lambda_sigma_CIFAR-10_resnet18",
             "noise_cifar10_resnet18_symmetric"}
    assert {path.name for path in out.iterdir()} == {f"{stem}.{suffix}" for stem in stems for suffix in ("png", "pdf")}
    for stem in stems:
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    assert "curves: left out" in printed  # the λ × σ settings of F-SAM: named, not drawn over each other


def test_plot_help_describes_the_script_in_whole_sentences(monkeypatch, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_script(monkeypatch, "plot", "--help")
    assert stopped.value.code == 0
    description = capsys.readouterr().out.split("\n\n")[1]  # after the usage lines
    assert " ".join(description.split()).endswith(
        "accuracy against the label-noise rate, F-SAM's EMA against the full gradient, and for runs measured by "
        "scripts/sharpness.py the loss along a random direction and accuracy against λ_max; PNG and PDF into "
        "results/figures/.")


def test_plot_draws_the_quick_starts_curves_where_a_new_user_has_them(runs_root, tmp_path, monkeypatch, capsys):
    assert run_script(monkeypatch, "plot", runs_root / "sgd" / "seed1", "--out-dir", tmp_path) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "curves_CIFAR-10_pyramidnet8.png").stat().st_size > 10_000
    assert "not drawn (λ × σ heatmap)" in capsys.readouterr().out
