"""`MODEL_CARD.md` beside every exported model, in the Hugging Face model-card layout.

Filled only from the run's own files: its saved config, `report.json` (test metrics, decision
threshold, imbalanced subset, class counts) and the export folder's `export.json` (files, their
parity check and metrics). Nothing is measured here, so the card quotes exactly the numbers
of those files; a missing piece is said to be missing, never guessed.
"""

from __future__ import annotations

import os
from pathlib import Path

from kd_keras.errors import KDError
from kd_keras.evaluation.evaluate import imbalanced_subset_table, metrics_table
from kd_keras.io import read_json, write_text
from kd_keras.prog import command
from kd_keras.reporting.run_report import export_table_markdown
from kd_keras.run.folder import RunFolder
from kd_keras.text import fmt

# What a card can say about a known dataset beyond what the run's files hold.
DATASET_NOTES = {
    "pneumoniamnist": (
        "PneumoniaMNIST (MedMNIST v2, Yang et al. 2023): paediatric chest X-rays (Kermany et "
        "al. 2018, one hospital in Guangzhou, children aged 1–5), labelled normal vs "
        "pneumonia, distributed as 28×28 greyscale images (larger sizes exist)"
    ),
}


def na(value, digits: int = 3) -> str:
    """`text.fmt` with the model card's placeholder for a missing number."""
    return fmt(value, digits, missing="n/a")


def _front_matter(run: RunFolder, report: dict) -> list[str]:
    cfg = run.cfg
    dataset = cfg.data.dataset if cfg.data.source == "medmnist" else cfg.data.source
    student = report.get("models", {}).get("student", {}).get("test")
    lines = ["---", "library_name: onnx", "pipeline_tag: image-classification",
             "tags: [image-classification, knowledge-distillation, keras, onnx, kd_keras]",
             f"datasets: [{dataset}]",
             "metrics: [accuracy, balanced_accuracy, f1, roc_auc]"]  # fmt: skip
    if student:
        lines += [
            "model-index:",
            f"- name: {run.name}-student",
            "  results:",
            "  - task: {type: image-classification}",
            f"    dataset: {{name: {dataset}, type: {dataset}, split: {report.get('split')}}}",
            "    metrics:",
        ]
        lines += [f"    - {{type: {key}, value: {na(student[key])}}}"
                  for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
                  if student.get(key) is not None]  # fmt: skip
    return lines + ["---", ""]


def _details(run: RunFolder, report: dict, export: dict | None) -> list[str]:
    cfg, dc = run.cfg, run.cfg.distill
    entry = report.get("models", {}).get("student", {})
    params = entry.get("params")
    lines = ["## Model details", ""]
    lines += [
        f"- **Model**: {cfg.student.arch} student (`{cfg.student.variant}` variant"
        + (f", {params / 1e6:.1f} M parameters" if params else "") + "), distilled from "
        + (f"the user's teacher ({run.arch('teacher')})" if cfg.teacher.from_user else
           f"the {cfg.teacher.arch} teacher (weights `{cfg.teacher.weights}`)")
        + " with kd_keras.",
        f"- **Distillation**: {dc.mode} targets, alpha {dc.alpha} (weight of the label "
        f"cross-entropy), temperature {dc.temperature}, feature-matching weight beta {dc.beta}.",
        f"- **Training**: {cfg.train.optimizer}, learning rate {cfg.train.learning_rate}, "
        f"{cfg.train.schedule} schedule, class weights `{cfg.train.class_weight}`; the epoch "
        f"kept is the best by `{cfg.train.monitor}` on the validation split.",
        f"- **Source run**: `{run.path.resolve()}` (config `config.toml`, metrics "
        "`report.json`).",
    ]  # fmt: skip
    if export is None:
        return lines + ["- **Files**: no `export.json` found beside this card.", ""]
    size = export.get("image_size") or report.get("image_size")
    lines += [
        f"- **Input**: `images`, float32 RGB pixels in [0, 255], NHWC, {size}×{size}, any "
        "batch size (normalisation is inside the model).",
        "- **Outputs**: `logits` and `probabilities` (softmax), one column per class: "
        + ", ".join(f"{i} = {c}" for i, c in enumerate(report.get("class_names", []))) + ".",
        f"- **Exported** with kd_keras {export.get('kd_keras_version', '?')} on "
        f"{export.get('created', '?')}, ONNX opset {export.get('opset', '?')}.",
        "",
    ]  # fmt: skip
    return lines


def _uses(run: RunFolder, report: dict) -> list[str]:
    names = report.get("class_names") or run.cfg.data.classes or []
    return [
        "## Intended use",
        "",
        f"Research and teaching: a small, fast classifier of {', '.join(names) or 'its classes'}"
        " to study knowledge distillation, class imbalance and deployment (ONNX, INT8) — e.g. "
        "comparing it with its teacher and with the same student trained without distillation.",
        "",
        "## Out-of-scope use",
        "",
        "- Any clinical or diagnostic decision, screening or triage. **This is not a medical "
        "device** and has not been validated on any patient population.",
        "- Images unlike the training data (other modalities, other hospitals or scanners, "
        "adults when trained on children, other resolutions) without re-evaluation.",
        "- Using the probabilities as calibrated risks, or the decision threshold on data "
        "with another class balance, without re-checking them on that data.",
        "",
    ]


def _data(run: RunFolder, report: dict) -> list[str]:
    cfg = run.cfg
    lines = ["## Training data", ""]
    if cfg.data.source == "medmnist":
        note = DATASET_NOTES.get(cfg.data.dataset, f"MedMNIST `{cfg.data.dataset}`")
        lines.append(f"{note}; the file used had {cfg.data.medmnist_size} px images.")
    else:
        lines.append(f"Data source `{cfg.data.source}` at `{cfg.data.path}`.")
    counts = report.get("data")
    if not counts:
        return lines + ["", "Class counts were not recorded in report.json.", ""]
    names = report["class_names"]
    lines += ["", "| split | " + " | ".join(names) + " | total | " +
              " | ".join(f"share {n}" for n in names) + " |",
              "|---|" + "---|" * (2 * len(names) + 1)]  # fmt: skip
    for split, per_class in counts.items():
        total = sum(per_class.values())
        shares = [f"{per_class[n] / total:.1%}" if total else "n/a" for n in names]
        lines.append(f"| {split} | " + " | ".join(str(per_class[n]) for n in names)
                     + f" | {total} | " + " | ".join(shares) + " |")  # fmt: skip
    extra = []
    if cfg.data.limit_train:
        extra.append(f"training split limited to a stratified {cfg.data.limit_train} images")
    if cfg.train.class_weight == "balanced":
        extra.append("class-balanced loss weights during training")
    if cfg.train.balanced_sampling:
        extra.append("class-balanced sampling during training")
    if cfg.train.logit_adjustment:
        extra.append(f"logit adjustment tau {cfg.train.logit_adjustment}")
    if extra:
        lines += ["", "Training: " + "; ".join(extra) + "."]
    return lines + [""]


def _preprocessing(run: RunFolder) -> list[str]:
    cfg, aug = run.cfg, run.cfg.augment
    augment = []
    if aug.random_resized_crop:
        augment.append(f"random resized crop (scale {aug.crop_scale_min}–1)")
    if aug.horizontal_flip:
        augment.append("horizontal flip")
    if aug.color_jitter:
        augment.append(f"colour jitter {aug.color_jitter}")
    if aug.mixup:
        augment.append(f"MixUp (Beta({aug.mixup}, {aug.mixup}))")
    return [
        "## Preprocessing",
        "",
        f"- Resize to {cfg.data.image_size}×{cfg.data.image_size} (bilinear); greyscale images"
        " are repeated to 3 channels; pixels stay in [0, 255] (float32). Feed the exported "
        "model exactly this; it normalises internally.",
        "- Training-time augmentation (not applied at inference): "
        + (", ".join(augment) if augment else "none") + ".",
        "",
    ]  # fmt: skip


def _metrics(run: RunFolder, report: dict, export: dict | None) -> list[str]:
    lines = ["## Evaluation", ""]
    models = report.get("models", {})
    student = models.get("student", {})
    if "test" not in student:
        return lines + [f"No test metrics in report.json: run `{command('evaluate')}`.", ""]
    t = student["test"]
    threshold = student.get("threshold")
    rule = (f"class {report['class_names'][1]} when P({report['class_names'][1]}) ≥ "
            f"{threshold:.3f} (threshold chosen on the validation split)"
            if threshold is not None else "argmax of the probabilities")  # fmt: skip
    lines += [
        f"On the {report.get('split', 'test')} split ({report.get('test_size', t['n'])} "
        f"images), decision rule: {rule}.",
        "",
        f"- accuracy **{na(t['accuracy'])}**, balanced accuracy "
        f"**{na(t['balanced_accuracy'])}**, macro F1 **{na(t['macro_f1'])}**, ROC AUC "
        f"**{na(t['roc_auc'])}**",
    ]  # fmt: skip
    lines += [f"- {c}: recall {na(m['recall'])}, precision {na(m['precision'])} "
              f"({m['support']} images)" for c, m in t["per_class"].items()]  # fmt: skip
    lines += ["", "Beside its teacher and the same student trained without distillation "
              "(Keras models):", "", metrics_table(report), ""]  # fmt: skip
    if "subset" in report:
        sub, names = report["subset"], report["class_names"]
        lines += [
            f"On a fixed imbalanced subset of the test split ({sub['minority']} "
            f"{names[sub['minority_class']]} vs {sub['majority']} "
            f"{names[1 - sub['minority_class']]}, seed {sub['seed']}), where a model that "
            "always predicts the majority class scores high accuracy but fails every minority "
            "case:",
            "",
            imbalanced_subset_table(report),
            "",
        ]
    if export is not None and export.get("artefacts"):
        lines += ["Each exported file, re-evaluated on the test split:", "",
                  export_table_markdown(export), ""]  # fmt: skip
    return lines


def _limitations(run: RunFolder, report: dict, export: dict | None = None) -> list[str]:
    cfg = run.cfg
    size = report.get("image_size", cfg.data.image_size)
    source = (f"{cfg.data.dataset} ({cfg.data.medmnist_size} px files)"
              if cfg.data.source == "medmnist" else cfg.data.source)  # fmt: skip
    lines = [
        "## Limitations",
        "",
        f"- Trained and evaluated at {size} px on {source}: fine detail a radiologist would "
        "use is not there, and results at other resolutions or on other data are unknown.",
        "- Not a medical device; not validated for clinical use. Test metrics come from one "
        f"split of one dataset ({report.get('test_size', '?')} images) and carry sampling "
        "error.",
        "- The decision threshold was chosen on this dataset's validation split; a population "
        "with another prevalence needs its own threshold.",
        (f"- Teacher: the user's ({run.arch('teacher')}); how it was trained is not recorded "
         "here" if cfg.teacher.from_user else f"- Teacher weights `{cfg.teacher.weights}`"
         + ("" if cfg.teacher.weights == "imagenet" else " (no ImageNet pre-training)"))
        + f"; student weights `{cfg.student.weights}`.",
        "- INT8 files can differ from FP32 on individual images; use their own row above.",
        *_int8_lines(export),
        "",
    ]  # fmt: skip
    return lines


def _int8_lines(export: dict | None) -> list[str]:
    """The ONNX INT8 recipe, the host it was checked on, and the speed caveat, if any."""
    if not export:
        return []
    groups: dict[tuple[str, str], list[str]] = {}
    for entry in export.get("artefacts", {}).values():
        q = entry.get("quantization", {})
        if "recipe" in q:
            host = q.get("checked_on", {})
            where = f"{host.get('cpu', '?')} ({host.get('isa_level', '?')})"
            groups.setdefault((q["recipe"], where), []).append(f"`{entry['file']}`")
    lines = [f"- {', '.join(files)}: {recipe}. Their rows above were measured on {where}."
             for (recipe, where), files in groups.items()]  # fmt: skip
    if export.get("int8_speed_note"):
        lines.append(f"- {export['int8_speed_note']}.")
    return lines


def _usage(report: dict, export: dict | None) -> list[str]:
    if export is None or "student" not in export.get("artefacts", {}):
        return []
    size = export.get("image_size") or report.get("image_size")
    threshold = export["artefacts"]["student"].get("threshold")
    decide = (f"pred = (probs[:, 1] >= {threshold}).astype(int)" if threshold is not None
              else "pred = probs.argmax(1)")  # fmt: skip
    return [
        "## How to use",
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        'session = ort.InferenceSession("student.onnx")',
        f"images = np.zeros((1, {size}, {size}, 3), np.float32)  # RGB pixels in [0, 255]",
        'logits, probs = session.run(["logits", "probabilities"], {"images": images})',
        decide,
        "```",
        "",
    ]


def model_card_markdown(run: RunFolder, export: dict | None = None) -> str:
    """The model card of a run's exported student (markdown with YAML front matter)."""
    report = run.report
    cfg = run.cfg
    title = f"# {run.name}: {cfg.student.arch} distilled from {run.arch('teacher')}"
    lines = _front_matter(run, report) + [title, ""]
    for part in (_details(run, report, export), _uses(run, report), _data(run, report),
                 _preprocessing(run), _metrics(run, report, export),
                 _limitations(run, report, export), _usage(report, export)):  # fmt: skip
        lines += part
    lines.append("*Written by kd_keras from the run's own files; nothing here was measured "
                 "separately.*")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_model_card(run: RunFolder | str | os.PathLike,
                     out_dir: str | os.PathLike | None = None) -> Path:  # fmt: skip
    """Write `MODEL_CARD.md` into the run's export folder (beside `export.json`)."""
    run = run if isinstance(run, RunFolder) else RunFolder.find(run)
    path = run.export_file(out_dir)
    try:
        export = read_json(path) if path.is_file() else None
    except KDError:
        export = None
    return write_text(run.model_card_path(out_dir), model_card_markdown(run, export))
