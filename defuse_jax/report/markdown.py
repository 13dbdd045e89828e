"""`report.md`: the human summary of a run, rendered from its `Report`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from defuse_jax.regions import top_pair
from defuse_jax.report.schema import JUDGE_AGREES, WORSE_BY
from defuse_jax.report.text import (
    _NA,
    _cell,
    _class_name,
    _is_labeled,
    _pp,
    _region_label,
    pct,
)
from defuse_jax.run_config import STAGES
from defuse_jax.run_dir import LABELS_FILE
from defuse_jax.search.config import source_readers


def _own_models_line(own: Mapping[str, Mapping[str, Any]]) -> str:
    """Which of the user's own models the run used, by name and weights' digest."""
    parts = []
    for role, d in sorted(own.items(), reverse=True):  # the classifier first
        frozen = f", {len(d['frozen'])} frozen" if d.get("frozen") else ""
        parts.append(
            f"your {role} `{d['name']}` ({d['kind']}, {d['num_weights']:,} weights{frozen}, "
            f"sha256 {d['sha256'][:12]})"
        )
    return "Models: " + " and ".join(parts) + "."


def _summary_lines(report: Mapping[str, Any]) -> list[str]:
    n_err = report["num_errors_found"]
    text = _own_models_line(report["own_models"]) + " " if report.get("own_models") else ""
    search = (report.get("search") or {}).get("config") or {}
    who = source_readers(search.get("validity", "none"))
    text += (
        f"The search started from {report['num_sources_used']:,} of {report['num_sources']:,} "
        f"source points ({report['num_sources_skipped']:,} skipped because {who} "
        f"already got them wrong), decoded and classified "
        f"{report['num_samples_evaluated']:,} samples and found {report['num_flips']:,} "
        f"misclassified ones, of which {n_err:,} error codes were kept."
    )
    if n_err == 0:
        text += " **No errors were found**, so there are no regions to label or correct."
    elif report["num_regions"] == 0:
        text += " Distillation kept **no region**, so there is nothing to label or correct."
    else:
        text += (
            f" Distillation kept {report['num_regions']} misclassification regions; "
            f"{report['num_regions_labeled']} labeled, {report['num_regions_skipped']} skipped."
        )
        if report.get("num_non_error_regions"):
            text += (
                f" {report['num_non_error_regions']} regions "
                f"({report['num_codes_in_non_error_regions']:,} error codes) are **not error "
                "regions** (the classifier gets most of their fresh samples right): they were "
                "not offered for labeling and are not in the region accuracy."
            )
        agree = report["num_regions_labeled"] - report.get(
            "num_regions_confirmed", report["num_regions_labeled"]
        )
        if agree > 0 and report.get("region_accuracy_scope") == "labeled":
            text += (
                f" The labeler sided with the classifier in all {agree} labeled regions: no "
                "labeled region is a confirmed error, so region accuracy covers every labeled "
                "region (the correction only has to keep them right)."
            )
        elif agree > 0:
            text += (
                f" {agree} labeled regions got the label the classifier already predicts (the "
                "labeler sided with the classifier): they are no bug and are not in the region "
                "accuracy, which covers the "
                f"{report.get('num_regions_confirmed', 0)} confirmed error regions."
            )
        if report["num_regions_labeled"] == 0:
            text += " **No region is labeled**, so the classifier was not corrected."
    worse = report.get("regions_worse_after") or []
    if worse:
        text += (
            f" **{len(worse)} labeled regions ended more than {WORSE_BY:.0%} worse than they "
            f"started** ({', '.join(map(str, worse))})."
        )
    contested = [r["id"] for r in report["regions"] if r.get("overlaps_with")]
    if contested:
        text += (
            f" {len(contested)} labeled regions overlap regions of another label "
            f"({', '.join(map(str, contested))}); "
            + (
                "their shared samples were trained on responsibility-weighted label mixes."
                if report["correction"].get("resolve_overlap")
                else "the correction trained each sample on its own region's label."
            )
        )
    lines = [text]
    lines += _bug_yield_lines(report)
    if report.get("oracle_agreement") is not None:
        ambiguous = [r["id"] for r in report["regions"] if r.get("ambiguous")]
        members = report.get("oracle_members") or 1
        size = "classifier (" if members == 1 else f"({members} classifiers, "
        on_errors = report.get("oracle_on_test_errors")
        lines += [
            "",
            f"Label validity: the oracle {size}trained separately, test accuracy "
            f"{pct(report.get('oracle_test_accuracy'))}"
            + (
                f", reads {pct(on_errors)} of the classifier's test errors as their label"
                if on_errors is not None
                else ""
            )
            + f") agrees with the region labels on "
            f"{pct(report['oracle_agreement'])} of fresh region samples (mean over the labeled "
            "regions). "
            + (
                f"**{len(ambiguous)} ambiguous labeled region{'s' * (len(ambiguous) != 1)}** "
                "(it disagrees on most of their samples): "
                f"{'region' if len(ambiguous) == 1 else 'regions'} "
                f"{', '.join(map(str, ambiguous))}. Their labels were kept; "
                "look at their grids before trusting their accuracy."
                if ambiguous
                else "No labeled region is ambiguous."
            ),
        ]
        if on_errors is not None and on_errors < SHARED_BLIND_SPOTS:
            lines += [
                "",
                f"The oracle reads only {pct(on_errors)} of the classifier's own test errors "
                "right: it shares the classifier's blind spots, so the search throws away real "
                "bugs it misreads, and it can label a bug region with the classifier's answer. "
                "An oracle trained on shifted images (`--oracle-shift`) often reads more of "
                "them (docs/results.md).",
            ]
    return lines


# Below this share of the classifier's test errors read right, the report says the oracle
# shares the classifier's blind spots (the 8x8 MLP oracles read 10-57%, shifted conv ones on
# 28x28 digits 67-100%).
SHARED_BLIND_SPOTS = 0.5


def _bug_yield_lines(report: Mapping[str, Any]) -> list[str]:
    found = report.get("bug_yield")
    if not found or found.get("bug") is None:
        return []
    validity = (report.get("search", {}).get("config") or {}).get("validity", "none")
    steer = (
        "the search counted every changed prediction (`--search-validity none`, the paper's)"
        if validity == "none"
        else f"the search kept only samples the {validity} still reads as the source class "
        f"(`--search-validity {validity}`)"
    )
    if ((report.get("config") or {}).get("vae") or {}).get("conditional"):
        steer += (
            ", and its VAE decodes from the source class (`--vae-conditional`): it moved the "
            "style alone"
        )
    return [
        "",
        f"Bug yield: of {found['codes_judged']:,} kept error codes, the judge reads "
        f"**{pct(found['bug'])} as their source class** (bugs: the image kept its class) and "
        f"{pct(found['class_change'])} as the class the classifier predicts (class changes). "
        f"The judge, {found['judge']} (test accuracy {pct(found['judge_test_accuracy'])}), "
        f"takes part in nothing else; {steer}.",
        *_test_error_yield_line(found),
        *_judges_line(found),
        *_judge_agrees_line(found, report.get("num_regions_confirmed")),
    ]


def _judges_line(found: Mapping[str, Any]) -> list[str]:
    """How the judge was chosen, and what the other candidates read (absent in older runs)."""
    judges = found.get("judges") or []
    if len(judges) < 2:
        return []
    each = "; ".join(
        f"{j['judge']}{' (chosen)' if j['chosen'] else ''}: {pct(j['on_right'])} of the images "
        f"the classifier gets right and {pct(j['on_wrong'])} of its errors, so "
        f"{pct(j['balanced'])}, and a bug yield of {pct(j['bug'])}"
        for j in judges
    )
    return [
        "",
        f"The judge was chosen among {len(judges)} candidates by how well it reads the test "
        f"images as their labels, the mean of its share on those the classifier gets right and "
        f"on its errors (a judge sharing the classifier's blind spots misreads the errors): "
        f"{each}.",
        "",
        # Blind audits of 28x28 digits and Fashion-MNIST runs read the codes between the two
        # judges every time (docs/results.md), so the range is what a reader should keep.
        f"The candidates read a bug yield between {pct(min(j['bug'] for j in judges))} and "
        f"{pct(max(j['bug'] for j in judges))}. For a reading independent of every model, "
        "`defuse-jax audit` gives a person a blind sample of the codes to label.",
    ]


def _judge_agrees_line(found: Mapping[str, Any], confirmed: int | None) -> list[str]:
    """The judge's second opinion on the confirmed regions' labels (absent in older runs)."""
    backed = found.get("confirmed_judge_agrees")
    if backed is None or not confirmed:
        return []
    return [
        "",
        f"Second opinion on the labels: the judge reads the label on at least "
        f"{JUDGE_AGREES:.0%} of the held-out samples of {backed} of the {confirmed} confirmed "
        "error regions (*judge agrees* below). A region is confirmed when the classifier gets "
        "its label wrong, which a wrong label does as well as a real bug; where the judge does "
        "not back a label, look at the region's grid.",
    ]


def _test_error_yield_line(found: Mapping[str, Any]) -> list[str]:
    """The judge's reading of certain bugs, the scale for the yield (absent in older runs)."""
    if found.get("test_error_yield") is None:
        return []
    return [
        "",
        f"For scale: the classifier gets {found['test_errors']:,} test images wrong, bugs by their "
        f"labels, and the judge reads {pct(found['test_error_yield'])} of them as their true "
        "class. Read the yield against this figure: a judge that shares the classifier's blind "
        "spots reads real bugs as class changes too.",
    ]


# What region accuracy averages over (`Report.region_accuracy_scope`), in words.
_SCOPES: Final = {"confirmed": "confirmed error regions", "labeled": "all labeled regions"}


def before_after_table(report: Mapping[str, Any]) -> str:
    """The before/after accuracy table of a report, as Markdown (e.g. for a notebook)."""
    return "\n".join(_results_table(report))


def _results_table(report: Mapping[str, Any]) -> list[str]:
    scope = _SCOPES.get(report.get("region_accuracy_scope") or "", "held-out region samples")
    rows = (
        ("Test accuracy", "test_accuracy"),
        (f"Region accuracy ({scope})", "region_accuracy"),
        (_codes_row(report.get("num_error_codes_labeled")), "error_code_accuracy"),
    )
    lines = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for name, key in rows:
        b, a = report.get(f"{key}_before"), report.get(f"{key}_after")
        lines.append(f"| {name} | {pct(b)} | {pct(a)} | {_pp(b, a)} |")
    return lines


def _codes_row(n: int | None) -> str:
    if n is None:  # a report from before the count was kept
        return "Accuracy on the found error codes in labeled regions"
    return f"Accuracy on the {n:,} found error codes in labeled regions (by the region's label)"


def _regions_section(report: Mapping[str, Any]) -> list[str]:
    regions = report["regions"]
    names = report["class_names"]
    if not regions:
        return ["No misclassification regions."]
    lines = []
    for title, group in (
        ("Error regions", [r for r in regions if r.get("error_region", True)
                           and r.get("confirmed_error") is not False]),
        ("Labeled as the classifier predicts (no bug; not in region accuracy)",
         [r for r in regions if r.get("confirmed_error") is False]),
        ("Not error regions (error rate below the threshold)",
         [r for r in regions if not r.get("error_region", True)]),
    ):  # fmt: skip
        if group:
            lines += [f"**{title}**", "", *_regions_table(group, names), ""]
    lines += [
        "*Error rate*: the share of fresh region samples the classifier does not call the "
        "region's majority source label (measured before labeling, to decide which regions are "
        "errors). *Accuracy*: the share of held-out region samples it calls the region's label. "
        "The two differ where the label is not the source label.",
        "",
    ]
    lines.pop()
    grids = [r for r in regions if r.get("grid")]
    if grids:
        lines += ["", "### Region samples", ""]
        for r in grids:
            lines += [
                f"**Region {r['id']}** ({_cell(_region_label(r, names))}):",
                "",
                f"![region {r['id']}]({r['grid']})",
                "",
            ]
        lines.pop()
    return lines


def _regions_table(regions: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    lines = [
        "| region | codes | weight | top source -> predicted | purity | error rate | label "
        "| oracle agrees | judge agrees | accuracy before -> after | overlap | bug yield |",
        "|---:|---:|---:|---|---:|---:|---|---|---:|---|---|---:|",
    ]
    for r in regions:
        src, pred = top_pair(r)  # the pair purity counts
        flow = f"{_class_name(names, src)} -> {_class_name(names, pred)}"
        acc = (
            f"{pct(r.get('accuracy_before'))} -> {pct(r.get('accuracy_after'))}"
            if _is_labeled(r)
            else _NA
        )
        lines.append(
            f"| {r['id']} | {r['num_codes']:,} | {float(r['weight']):.3f} | {_cell(flow)} "
            f"| {pct(r.get('purity'))} | {pct(r.get('error_rate'))} "
            f"| {_cell(_region_label(r, names))} | {_cell(_oracle_cell(r, names))} "
            f"| {pct(r.get('judge_agreement'))} | {acc} "
            f"| {_overlap_cell(r)} | {pct(r.get('bug_yield'))} |"
        )
    return lines


def _overlap_cell(region: Mapping[str, Any]) -> str:
    if not region.get("overlaps_with"):
        return "none" if region.get("contested") is not None else _NA
    ids = ", ".join(map(str, region["overlaps_with"]))
    return f"{pct(region.get('contested'))} contested (with {ids})"


def _oracle_cell(region: Mapping[str, Any], names: Sequence[str]) -> str:
    """'92%', or '12% **ambiguous** (says 7)', or n/a when the label was not checked."""
    agreement = region.get("oracle_agreement")
    if agreement is None:
        return _NA
    if not region.get("ambiguous"):
        return pct(agreement)
    return f"{pct(agreement)} **ambiguous** (says {_class_name(names, region.get('oracle_label'))})"


def _timings_section(stage_seconds: Mapping[str, float]) -> list[str]:
    if not stage_seconds:
        return ["No stage timings recorded."]
    order = [s for s in STAGES if s in stage_seconds]
    order += sorted(s for s in stage_seconds if s not in STAGES)
    lines = ["| stage | seconds |", "|---|---:|"]
    total = 0.0
    for s in order:
        sec = stage_seconds[s]
        total += float(sec or 0.0)
        lines.append(f"| {_cell(s)} | {_NA if sec is None else f'{float(sec):.1f}'} |")
    lines.append(f"| **total** | **{total:.1f}** |")
    return lines


def correction_summary(report: Mapping[str, Any]) -> str:
    """How the corrected model was chosen, as one Markdown paragraph (e.g. for a notebook)."""
    corr = report.get("correction") or {}
    if corr.get("skipped"):
        return f"Correction was skipped: {corr.get('reason') or 'no reason given'}."
    return " ".join(_correction_lines(corr) + _control_lines(report)) if corr else ""


def _control_lines(report: Mapping[str, Any]) -> list[str]:
    """What the same fine-tuning without regions did (`ControlReport`), next to the correction."""
    ctl = (report.get("correction") or {}).get("control")
    if not ctl:
        return []
    before = report["test_accuracy_before"]
    return [
        f"Control: the same fine-tuning ({ctl['epochs']} epochs, same seed and batches) on the "
        f"training data alone, without any region sample, moves test accuracy "
        f"{pct(before)} -> {pct(ctl['test_accuracy'])} "
        f"({_pp(before, ctl['test_accuracy'])}, against "
        f"{_pp(before, report['test_accuracy_after'])} with the regions) and region accuracy "
        f"{pct(report['region_accuracy_before'])} -> {pct(ctl['region_accuracy'])} "
        f"(against {pct(report['region_accuracy_after'])}): a test change the control shares "
        "comes from continued training, not from the regions."
    ]


def _correction_lines(corr: Mapping[str, Any]) -> list[str]:
    """How the kept model was chosen (or that the reference schedule was used)."""
    sec = corr.get("seconds")
    took = f" ({float(sec):.1f} s)" if sec is not None else ""
    sel = corr.get("selection")
    if not sel:
        return [
            f"Correction fine-tuned the classifier for {corr.get('epochs')} epochs with "
            f"lambda = {corr.get('lam')}{took}, keeping the last epoch (no choice on "
            "validation data)."
        ]
    chosen, original = sel["chosen"], sel["original"]
    tried = ", ".join(sel.get("per_lam", {}))
    watched = len(sel.get("watched_regions", []))
    scores = (
        f"validation accuracy {pct(original['val_accuracy'])} -> {pct(chosen['val_accuracy'])} "
        f"on {sel.get('num_val')} validation images, accuracy on the choice's own fresh "
        f"samples of the {watched} watched regions {pct(original['region_accuracy'])} -> "
        f"{pct(chosen['region_accuracy'])}, drawn apart from the evaluation's"
    )
    if sel.get("kept_original"):
        return [
            f"Correction tried lambda in {{{tried}}}, but no epoch both stayed within the "
            "allowed losses on held-out data (validation accuracy, every labeled region) and "
            f"fixed the watched regions better than the original, so **the original classifier "
            f"is kept**{took}."
        ]
    return [
        f"Correction tried lambda in {{{tried}}} and kept **lambda = {chosen['lam']:g}, epoch "
        f"{chosen['epoch']}**: of the epochs within a point of the best fix, the one that "
        f"breaks the fewest shifted training images{_churn(chosen)} (then the gentlest: "
        "smallest lambda, earliest epoch), chosen on held-out data, never on the test "
        f"split ({scores}){took}. The paper's reference is lambda = 0.01, last epoch "
        "(`--no-correct-select`)." + _given_up(sel.get("given_up") or [])
    ]


def _given_up(given_up: Sequence[Mapping[str, Any]]) -> str:
    if not given_up:
        return ""
    many = len(given_up) > 1
    which = ", ".join(f"{g['region']} ({pct(g['before'])} -> {pct(g['after'])})" for g in given_up)
    return (
        f" **{len(given_up)} labeled region{'s' * (len(given_up) != 1)} could not be held** "
        f"with the rest: every epoch that fixed the watched regions broke "
        f"{'them' if many else 'it'} (accuracy on the choice's samples before -> after: "
        f"{which}), so {'they were' if many else 'it was'} given up rather than the whole "
        "correction (`--correct-max-given-up`, a share of the labeled regions; 0 keeps the "
        "original instead). Look at their grids: a region the classifier's own training keeps "
        "moving, or one pulled both ways by another region, cannot be held."
    )


def _churn(chosen: Mapping[str, Any]) -> str:
    n = chosen.get("shifted_broken")
    return "" if n is None else f" ({n:,})"  # None: a run from before it was scored


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str], *, run_dir: str) -> str:
    """Render the human summary of a run (see :func:`write_report` for the report schema)."""
    out = [f"# Defuse report: {report['dataset']}", "", "## What happened", ""]
    out += _summary_lines(report)
    if report.get("messages"):
        out += ["", "Notes:", ""] + [f"- {m}" for m in report["messages"]]

    out += ["", "## Before / after correction", ""] + _results_table(report)
    if report.get("correction"):
        out += ["", correction_summary(report)]

    out += ["", "## Regions", ""] + _regions_section(report)

    if plots:
        out += ["", "## Plots", ""]
        if "latent_pca" in plots:
            out += ["![latent PCA of the error codes by region](" + plots["latent_pca"] + ")", ""]
        if "region_accuracy" in plots:
            out += ["![accuracy before and after per region](" + plots["region_accuracy"] + ")", ""]
        out.pop()

    out += ["", "## Stage timings", ""] + _timings_section(report.get("stage_seconds") or {})
    dev = report.get("devices") or {}
    if dev:
        devices = ", ".join(str(d) for d in dev.get("devices") or []) or _NA
        out += ["", f"Backend: {dev.get('backend', _NA)}; devices: {devices}."]

    out += [
        "",
        "## Relabel and rerun",
        "",
        f"The region labels live in `{LABELS_FILE}`. To change some, edit their `label` cells "
        "(a class name or index, or `skip`) and rerun: only the correction and the evaluation are "
        "redone. To label the regions by hand in the terminal instead (a run labeled "
        "automatically then redoes its label stage, which asks every region):",
        "",
        "```sh",
        f"defuse-jax label --out {run_dir} --labeler manual",
        f"defuse-jax run --out {run_dir}",
        "```",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- entry point
