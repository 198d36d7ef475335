"""How faithfully a lossy store reproduces a lossless one's teacher targets, measured without training.

A student trained on digits cannot show a cost below about a point (one test image is 0.28 points and a seed's
spread about a point), while the targets themselves can be compared exactly. :func:`store_fidelity` reads a lossy
store and a reference store of the same teachers, rows and views chunk by chunk and reports, per teacher:

- for the logits, the mean KL(reference soft targets at T || the lossy store's at T) for T = 1 and T = 4 (the
  temperatures of MEAL's reference and of meal-cache's default soft labels), and the top-1 agreement; and what
  the lossy targets do to the soft-label loss's gradient with respect to the student's logits, which is
  proportional to (student - target) at T: per row the error e = lossy target - reference target, reported as
  its mean L1 norm (``error``: bias and noise together) and as the L1 norm of its mean over rows with classes in
  each row's reference rank order (``bias``: what averaging over rows and epochs does not remove; top-k's flat
  tail is a bias, sampled classes' counts are noise around zero);
- for every block array (pooled ``blocks`` and channel-mean ``maps``), the relative L2 error
  ``||lossy - reference|| / ||reference||`` over all values (where the store projected a block and the reference
  did not, against the reference projected the same way, with what the projection keeps of the reference's rows:
  the share of their variance and the relative error of distances between them), and for ``maps`` the change in
  the soft-ce block loss per row: the mean absolute difference between the soft cross-entropy of the reference map
  (standing in for a student that matches the teacher) against the lossy map and against the reference map, i.e.
  how much the block loss moves when its target is the lossy map.

:func:`fidelity_verdict` judges each target against the bars docs/design.md sets for a lossy option to become a
default ("Lossy stores: what the presets choose"): the soft targets within :data:`KL_BAR` nats of KL at T = 1 and
T = 4 with every top-1 kept, every block and map array within :data:`RELATIVE_L2_BAR` relative L2, and the maps'
soft-ce block loss moved by at most :data:`SOFT_CE_BAR`. Sampled logits are not judged by the KL (a draw's KL is
large by construction; their error is noise that averages over views and epochs: see the gradient bias), and a
projection's variance kept has no bar. A reference that is itself lossy is named, and no verdict is given: the
numbers are then differences between two lossy stores, not errors against the teachers' outputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from meal_cache.dense import DenseTargets
from meal_cache.errors import UserError
from meal_cache.projection import ProjectionSums, column_norm, project, stored_projections
from meal_cache.store.describe import lossy_parts
from meal_cache.store.keys import feature_key, feature_name, logits_key
from meal_cache.store.teacher_store import TeacherStore, open_store
from meal_cache.views.augment import square_sizes

TEMPERATURES = (1.0, 4.0)
# docs/design.md's bars for a lossy default (module doc).
KL_BAR = 0.01  # nats, at every one of TEMPERATURES
TOP1_BAR = 100.0  # % of rows whose top-1 class is the reference's
RELATIVE_L2_BAR = 0.01
SOFT_CE_BAR = 0.01  # nats a row
BARS_TEXT = (f"KL <= {KL_BAR:g} at T=1 and T=4, top-1 agreement {TOP1_BAR:g}%, relative L2 <= "
             f"{100 * RELATIVE_L2_BAR:g}%, soft-ce change <= {SOFT_CE_BAR:g}")  # fmt: skip
LOSSLESS_HINT = "extract the reference with --quantize none --logits all --project 0 and no --keep-bits"


def reference_losses(reference: TeacherStore) -> list[str]:
    """What makes a store unfit as a reference: its lossy layout, and blocks it stores projected."""
    lossy = lossy_parts(reference.layout)
    projected = sorted({b.key for t in reference.teacher_names for b in reference.blocks(t)
                        if b.projected_from is not None})  # fmt: skip
    if projected:
        lossy.append(f"blocks {', '.join(projected)} projected")
    return lossy


def _check_comparable(store: TeacherStore, reference: TeacherStore) -> None:
    """Refuse a pair of stores whose rows, views or teachers differ: their targets are not of the same images."""
    mine, theirs = store.dataset, reference.dataset
    for key in ("fingerprint", "split", "n", "num_classes"):
        if mine.get(key) != theirs.get(key):
            raise UserError(f"the stores hold other rows ({key}: {mine.get(key)!r} against {theirs.get(key)!r})")
    if reference.dense:
        raise UserError("the reference is a dense store; compare against a lossless store of views (a dense store's "
                        "targets are judged against the teachers run on the reference's crops)")  # fmt: skip
    if store.dense:  # its targets are derived for the reference's own crops: any views will do
        return
    if store.attrs["views"] != reference.attrs["views"]:  # count, seed, recipe and identity view
        raise UserError(f"the stores hold other views ({store.attrs['views']} against {reference.attrs['views']})")
    missing = [t for t in store.teacher_names if t not in reference.teacher_names]
    if missing:
        raise UserError(f"the reference store has no teacher {', '.join(missing)} (it has "
                        f"{', '.join(reference.teacher_names)})")  # fmt: skip
    for teacher in store.teacher_names:
        if store.teacher(teacher)["checkpoint_sha256"] != reference.teacher(teacher)["checkpoint_sha256"]:
            raise UserError(f"teacher {teacher} is another checkpoint in the reference store (sha256 differs)")
    for view in range(store.num_views):
        mine, theirs = store.view_params(view), reference.view_params(view)
        same_vflip = (mine.vflip is None) == (theirs.vflip is None) and (mine.vflip is None or
                                                                       mine.vflip.equal(theirs.vflip))  # fmt: skip
        if not (mine.crop.equal(theirs.crop) and mine.flip.equal(theirs.flip) and same_vflip):
            raise UserError(f"view {view} has other crops or flips in the two stores (another --seed?)")


class _Sums:
    """Running sums for one teacher, so a store is compared chunk by chunk in bounded memory."""

    def __init__(self) -> None:
        self.rows = 0
        self.kl = dict.fromkeys(TEMPERATURES, 0.0)
        self.gradient_error = dict.fromkeys(TEMPERATURES, 0.0)
        self.ranked_error: dict[float, torch.Tensor] = {}  # the sum over rows of e, classes in reference rank order
        self.agree = 0
        self.squared_error: dict[str, float] = {}
        self.squared_norm: dict[str, float] = {}
        self.loss_change: dict[str, float] = {}
        self.projection: dict[str, tuple[ProjectionSums, float]] = {}  # the projection's sums and column norm

    def add_logits(self, lossy: np.ndarray, reference: np.ndarray) -> None:
        lossy_t, reference_t = torch.from_numpy(lossy).double(), torch.from_numpy(reference).double()
        for temperature in TEMPERATURES:
            log_lossy = F.log_softmax(lossy_t / temperature, dim=1)
            log_reference = F.log_softmax(reference_t / temperature, dim=1)
            kl = (log_reference.exp() * (log_reference - log_lossy)).sum(1)
            self.kl[temperature] += float(kl.sum())
            error = log_lossy.exp() - log_reference.exp()
            self.gradient_error[temperature] += float(error.abs().sum())
            ranked = error.gather(1, reference_t.argsort(1, descending=True)).sum(0)
            self.ranked_error[temperature] = self.ranked_error.get(temperature, 0) + ranked
        self.agree += int((lossy_t.argmax(1) == reference_t.argmax(1)).sum())
        self.rows += len(lossy)

    def add_block(self, key: str, lossy: np.ndarray, reference: np.ndarray) -> None:
        lossy_t, reference_t = torch.from_numpy(lossy).double(), torch.from_numpy(reference).double()
        self.squared_error[key] = self.squared_error.get(key, 0.0) + float(((lossy_t - reference_t) ** 2).sum())
        self.squared_norm[key] = self.squared_norm.get(key, 0.0) + float((reference_t**2).sum())
        if key.startswith("maps/"):  # soft-ce per row, with the reference map standing in for the student's
            student = F.log_softmax(reference_t.flatten(1), dim=1)
            exact = -(F.softmax(reference_t.flatten(1), dim=1) * student).sum(1)
            moved = -(F.softmax(lossy_t.flatten(1), dim=1) * student).sum(1)
            self.loss_change[key] = self.loss_change.get(key, 0.0) + float((moved - exact).abs().sum())

    def add_projection(self, key: str, reference: np.ndarray, matrix: torch.Tensor) -> np.ndarray:
        """The reference's block rows projected as the store's were (returned, to compare the store's with), and
        what the projection keeps of them added to the sums."""
        scale = column_norm(matrix)
        projected = project(torch.from_numpy(reference).double(), matrix.double()).numpy()
        sums, _ = self.projection.setdefault(key, (ProjectionSums(), scale))
        sums.add(reference, projected, scale)
        return projected

    def summary(self, rows_per_block: dict[str, int]) -> dict:
        return {
            "rows": self.rows,
            "kl": {f"T={t:g}": self.kl[t] / max(1, self.rows) for t in TEMPERATURES},
            "top1_agreement": 100.0 * self.agree / max(1, self.rows),
            "gradient": {
                f"T={t:g}": {"bias": float(self.ranked_error[t].abs().sum()) / max(1, self.rows),
                             "error": self.gradient_error[t] / max(1, self.rows)}
                for t in TEMPERATURES if t in self.ranked_error
            },
            "blocks": {
                key: {
                    "relative_l2": (self.squared_error[key] / self.squared_norm[key]) ** 0.5
                    if self.squared_norm[key] > 0 else 0.0,
                    **({"soft_ce_change": self.loss_change[key] / max(1, rows_per_block[key])}
                       if key in self.loss_change else {}),
                    **({"projection": self.projection[key][0].summary(self.projection[key][1])}
                       if key in self.projection else {}),
                }
                for key in sorted(self.squared_error)
            },
        }  # fmt: skip


def store_fidelity(path: str, reference_path: str) -> dict:
    """Per teacher of the store at ``path``: how far its targets are from those of ``reference_path`` (a lossless
    store of the same teachers, rows and views), over every view and row. See the module's docstring."""
    store, reference = open_store(path), open_store(reference_path)
    _check_comparable(store, reference)
    kinds = [k for k in store.layout.features if k in reference.layout.features]
    views = reference.num_views if store.dense else store.num_views
    result = {"store": str(path), "reference": str(reference_path), "views": views, "teachers": {},
              "reference_lossy": reference_losses(reference),
              "logits_sampled": store.layout.logits_estimated}  # fmt: skip
    read = _DenseReader(store, reference) if store.dense else store.read
    for teacher in store.teacher_names:
        sums = _Sums()
        blocks = [b.key for b in store.blocks(teacher)]
        # Blocks this store projected and the reference did not: the reference's rows are projected the same way,
        # and what the projection keeps of them is measured beside the coding's error.
        unprojected = {b.key for b in reference.blocks(teacher) if b.projected_from is None}
        projections = {b: m for b, m in stored_projections(store, teacher).items() if b in unprojected}
        block_rows: dict[str, int] = {}
        for view in range(views):
            for chunk in range(store.n_chunks):
                rows = store.chunk_rows(chunk)
                logits = logits_key(teacher)
                sums.add_logits(read(logits, view, rows), reference.read(logits, view, rows))
                for kind in kinds:
                    for block in blocks:
                        key, name = feature_key(teacher, kind, block), feature_name(kind, block)
                        theirs = reference.read(key, view, rows)
                        if kind == "blocks" and block in projections:
                            theirs = sums.add_projection(name, theirs, projections[block])
                        sums.add_block(name, read(key, view, rows), theirs)
                        block_rows[name] = block_rows.get(name, 0) + rows.stop - rows.start
        result["teachers"][teacher] = sums.summary(block_rows)
    return result


class _DenseReader:
    """A dense store's targets of the reference's crops, read as a store of views reads its own (one view and some
    rows at a time): what distill would derive for exactly the images the reference's teachers saw."""

    def __init__(self, store: TeacherStore, reference: TeacherStore) -> None:
        self.store, self.reference = store, reference
        self.sizes = reference.source_sizes()
        if self.sizes is None:
            self.sizes = square_sizes(reference.n, int(reference.dataset["image_size"]))
        self.params: tuple[int, object] | None = None
        self.derive = DenseTargets(store, [])  # blocks and logits only: maps are never compared with a dense store

    def __call__(self, key: str, view: int, rows: slice) -> np.ndarray:
        if self.params is None or self.params[0] != view:
            self.params = (view, self.reference.view_params(view))
        params = self.params[1][torch.arange(rows.start, rows.stop)]
        stored = {key: torch.from_numpy(self.store.read(key, 0, rows).astype(np.float32))}
        derived = self.derive(stored, params, self.sizes[rows])
        return derived[key].numpy()


def _judged(summary: dict, logits_sampled: bool) -> tuple[list[str], list[str]]:
    """One teacher's targets within the bars (their names) and outside them (name and the number that misses)."""
    within, outside = [], []
    if not logits_sampled:
        kl_over = {t: v for t, v in summary["kl"].items() if v > KL_BAR}
        misses = [f"KL at {t} {v:.2e} > {KL_BAR:g}" for t, v in kl_over.items()]
        if summary["top1_agreement"] < TOP1_BAR:
            misses.append(f"top-1 agreement {summary['top1_agreement']:.2f}% < {TOP1_BAR:g}%")
        (outside.append(f"logits ({', '.join(misses)})") if misses else within.append("logits"))
    for block, values in summary["blocks"].items():
        misses = []
        if values["relative_l2"] > RELATIVE_L2_BAR:
            misses.append(f"relative L2 {values['relative_l2']:.2e} > {RELATIVE_L2_BAR:g}")
        if values.get("soft_ce_change", 0.0) > SOFT_CE_BAR:
            misses.append(f"soft-ce change {values['soft_ce_change']:.2e} > {SOFT_CE_BAR:g}")
        (outside.append(f"{block} ({', '.join(misses)})") if misses else within.append(block))
    return within, outside


def fidelity_verdict(result: dict) -> dict | None:
    """Per teacher, which targets are within docs/design.md's bars and which are not (module doc); None where the
    reference is lossy, so the numbers are no errors to judge."""
    if result["reference_lossy"]:
        return None
    verdict = {}
    for teacher, summary in result["teachers"].items():
        within, outside = _judged(summary, result["logits_sampled"])
        verdict[teacher] = {"within": within, "outside": outside}
    return verdict


def _verdict_lines(result: dict, verdict: dict | None) -> list[str]:
    if verdict is None:
        return [f"verdict: none, the reference is lossy ({', '.join(result['reference_lossy'])}): {LOSSLESS_HINT}"]
    outside = [f"{teacher} {target}" for teacher, judged in verdict.items() for target in judged["outside"]]
    judged_count = sum(len(j["within"]) + len(j["outside"]) for j in verdict.values())
    sampled = ("; the logits (sampled classes) are not judged: a draw's KL is large by construction, and its "
               "error is noise that averages over views and epochs (see the gradient bias)"
               if result["logits_sampled"] else "")  # fmt: skip
    if not outside:
        return [f"verdict: fine, all {judged_count} judged targets within the bars ({BARS_TEXT}){sampled}"]
    return [f"verdict: NOT FINE, {len(outside)} of {judged_count} judged targets outside the bars ({BARS_TEXT})"
            f"{sampled}:",
            *(f"  {line}" for line in outside)]  # fmt: skip


def describe_fidelity(result: dict) -> str:
    """The fidelity of a store as text, one teacher a paragraph, then the verdict against the bars."""
    lines = [f"fidelity of {result['store']} against {result['reference']} ({result['views']} views)"]
    if result["reference_lossy"]:
        lines.append(f"  the reference is lossy ({', '.join(result['reference_lossy'])}): these are differences "
                     "between two lossy stores, not errors against the teachers' outputs")  # fmt: skip
    verdict = fidelity_verdict(result)
    for teacher, summary in result["teachers"].items():
        kl = "  ".join(f"KL at {t} {value:.2e}" for t, value in summary["kl"].items())
        lines.append(f"  {teacher}: logits  {kl}  top-1 agreement {summary['top1_agreement']:.2f}%")
        gradient = "  ".join(f"at {t} bias {v['bias']:.2e} error {v['error']:.2e}"
                             for t, v in summary["gradient"].items())  # fmt: skip
        lines.append(f"    soft-label gradient (L1 of target - reference): {gradient}")
        for block, values in summary["blocks"].items():
            change = f"  soft-ce change {values['soft_ce_change']:.2e}" if "soft_ce_change" in values else ""
            if "projection" in values:
                kept = values["projection"]
                change += (f"  projection keeps {100 * kept['variance_kept']:.1f}% of the variance, distances "
                           f"within {100 * kept['distance_error']:.1f}%")  # fmt: skip
            lines.append(f"    {block}: relative L2 error {values['relative_l2']:.2e}{change}")
        if verdict is not None:
            outside = [entry.split(" (")[0] for entry in verdict[teacher]["outside"]]
            lines.append(f"    verdict: outside the bars: {', '.join(outside)}" if outside else "    verdict: fine")
    lines.extend(_verdict_lines(result, verdict))
    return "\n".join(lines)
