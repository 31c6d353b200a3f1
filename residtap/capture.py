"""Interactive capture of activations at named sites.

    with residtap.capture(model, ["layers.3", "logits"], positions="last") as acts:
        model(**batch)
    acts["layers.3"]                # (B, d_model): each row's last real token
    acts.per_sequence("layers.3")   # with positions="all": list of (n_b, d_model), pads dropped

It works across `model.generate(...)` too: the prefill and every decode step are recorded and
joined along time, so `acts["layers.3"]` is (B, T_prompt + n_new - 1, d) for the whole padded
sequence. The last generated token is never fed back into the model, so it has no activation.
(With the KV cache; `use_cache=False` re-runs the whole sequence at each step, and each step is
then a run of its own.)

Clone/detach policy: tensors are detached from autograd by default (`detach=False` keeps the
graph, for gradient-based attributions). They are not copied: a Hugging Face module returns a
fresh tensor that nothing writes into afterwards, so keeping a reference is safe and free. Pass
`clone=True` for a model that edits its activations in place after producing them. `dtype`
casts (default: keep the model's dtype, bf16 included); `device` moves (default: stay put).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from residtap.engine import Step, TapBlock
from residtap.positions import Positions, check_positions, per_sequence, select_positions
from residtap.sites import Arch, resolve_site


@dataclass
class Run:
    """One sequence's forwards: a plain forward, or a generate call's prefill and decode steps."""

    steps: dict[str, list[Tensor]] = field(default_factory=dict)  # site -> (B, T_step, ...)
    masks: list[Tensor | None] = field(default_factory=list)  # attention mask of each step
    lengths: list[int] = field(default_factory=list)  # tokens fed at each step

    def mask(self) -> Tensor | None:
        """The attention mask covering every token fed during the run (None: all real)."""
        return self.masks[-1] if self.masks else None

    def joined(self, site: str) -> Tensor:
        parts = self.steps.get(site)
        if not parts:
            raise LookupError(
                f"site {site!r} never fired during the capture: the model ran no forward in "
                "the `with` block, stopped before reaching it, or never calls that module"
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class Activations:
    """What a capture recorded: `acts[site]`, `acts.per_sequence(site)`, `acts.runs`."""

    def __init__(self, sites: list[str], positions: Positions) -> None:
        self.sites = sites
        self.positions = positions
        self.runs: list[Run] = []
        self._run_id: int | None = None
        self._step_id: tuple[int, int] | None = None

    def _record(self, site: str, step: Step, tensor: Tensor) -> None:
        if step.run != self._run_id:
            self.runs.append(Run())
            self._run_id = step.run
        run = self.runs[-1]
        if (step.run, step.index) != self._step_id:
            self._step_id = (step.run, step.index)
            run.masks.append(step.attention_mask)
            run.lengths.append(step.length)
        run.steps.setdefault(site, []).append(tensor)

    def _single_run(self) -> Run:
        if len(self.runs) == 1:
            return self.runs[0]
        if not self.runs:
            raise LookupError(
                "nothing was captured: no forward ran inside the `with` block "
                f"(sites {self.sites}); call the model inside it"
            )
        raise ValueError(
            f"the capture holds {len(self.runs)} separate runs (forwards without a KV cache "
            "each start one); read them with acts.runs[i], e.g. acts.run(i)[site]"
        )

    def _mask_for(self, run: Run, site: str, hidden: Tensor) -> Tensor | None:
        mask = run.mask()
        total = sum(run.lengths)
        if hidden.dim() < 2 or hidden.shape[1] != total:
            raise ValueError(
                f"site {site!r} covers {tuple(hidden.shape)} but {total} tokens were fed, so its "
                "positions cannot be matched to tokens (during generate the model computes "
                "logits only for the last position of each step); use positions='all'"
            )
        return mask

    def __getitem__(self, site: str) -> Tensor:
        return self.run()[site]

    def __contains__(self, site: str) -> bool:
        return site in self.sites

    def keys(self) -> list[str]:
        return list(self.sites)

    def run(self, i: int | None = None) -> RunView:
        """Run i's activations (default: the only run), positions applied on access."""
        return RunView(self, self._single_run() if i is None else self.runs[i])

    def per_sequence(self, site: str, run: int | None = None) -> list[Tensor]:
        """Each row's activations at its real tokens: list of (n_b, ...) with pads dropped."""
        r = self._single_run() if run is None else self.runs[run]
        hidden = r.joined(site)
        return per_sequence(hidden, self._mask_for(r, site, hidden))

    @property
    def attention_mask(self) -> Tensor | None:
        return self._single_run().mask()

    def __repr__(self) -> str:
        """Sites with their shapes (positions applied), runs and forward steps; no values."""
        if not self.runs:
            return (f"Activations(no forward captured yet, sites={self.sites}, "
                    f"positions={self.positions!r})")
        steps = sum(len(r.lengths) for r in self.runs)
        head = f"runs={len(self.runs)}, forwards={steps}, positions={self.positions!r}"
        more = "; shapes of run 0" if len(self.runs) > 1 else ""
        return f"Activations({head}{more}, sites={{{_shapes(RunView(self, self.runs[0]))}}})"


class RunView:
    """Lazy {site: tensor} view of one run; the positions policy is applied on access."""

    def __init__(self, acts: Activations, run: Run) -> None:
        self._acts, self._run = acts, run

    def keys(self) -> list[str]:
        return list(self._acts.sites)

    def __repr__(self) -> str:
        return f"RunView(forwards={len(self._run.lengths)}, sites={{{_shapes(self)}}})"

    def __getitem__(self, site: str) -> Tensor:
        if site not in self._acts.sites:
            raise KeyError(f"site {site!r} was not captured; captured: {self._acts.sites}")
        hidden = self._run.joined(site)
        policy = self._acts.positions
        if isinstance(policy, str) and policy == "all":
            return hidden
        return select_positions(hidden, self._acts._mask_for(self._run, site, hidden), policy)


def _shapes(view: RunView) -> str:
    """"'site': (B, d) float32" for each site of one run, as a repr shows them."""
    parts = []
    for site in view.keys():
        try:
            t = view[site]
            parts.append(f"{site!r}: {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
        except (LookupError, ValueError):  # never fired, or positions that do not apply
            parts.append(f"{site!r}: not available")
    return ", ".join(parts)


class _Recorder:
    """A reader tap: keeps each step's tensor (detached, optionally cast/moved/cloned)."""

    def __init__(self, acts, site, detach, clone, dtype, device) -> None:
        self.acts, self.site = acts, site
        self.detach, self.clone, self.dtype, self.device = detach, clone, dtype, device

    def __call__(self, hidden: Tensor, step: Step) -> None:
        t = hidden.detach() if self.detach else hidden
        if self.dtype is not None or self.device is not None:
            t = t.to(dtype=self.dtype, device=self.device, non_blocking=True)
        if self.clone and t.data_ptr() == hidden.data_ptr():
            t = t.clone()
        self.acts._record(self.site, step, t)


class Capture(TapBlock):
    """`with capture(...) as acts:` — a tap block whose value is the Activations."""

    def __init__(self, model: nn.Module, sites: Iterable[str], *, positions: Positions = "all",
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 detach: bool = True, clone: bool = False, stop_early: bool = False,
                 arch: Arch | None = None) -> None:
        if isinstance(sites, str):
            sites = [sites]
        if not isinstance(sites, Iterable):
            raise TypeError(
                f"sites must be a list of site names such as ['layers.3'], got "
                f"{type(sites).__name__}"
            )
        sites = list(sites)
        if not sites:
            raise ValueError("sites is empty; name at least one site, e.g. ['layers.0']")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
        check_positions(positions)
        resolved = [resolve_site(model, s, arch) for s in sites]
        names = [s.name for s in resolved]
        self.acts = Activations(names, positions)
        taps = {s: _Recorder(self.acts, s.name, detach, clone, dtype, device) for s in resolved}
        super().__init__(model, taps, stop_early=stop_early, arch=arch)

    def __enter__(self) -> Activations:
        super().__enter__()
        return self.acts


def capture(
    model: nn.Module,
    sites: Iterable[str] | str,
    *,
    positions: Positions = "all",
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    detach: bool = True,
    clone: bool = False,
    stop_early: bool = False,
    arch: Arch | None = None,
) -> Capture:
    """Capture activations at `sites` during the forwards run inside the `with` block.

    positions: "all" (default), "last", indices into each row's real tokens, or a (B, T) bool
    mask; see residtap.positions. stop_early: stop each forward once every site has fired
    (the rest of the model does not run; outputs are not produced). See the module docstring
    for generate and for the clone/detach policy."""
    return Capture(model, sites, positions=positions, dtype=dtype, device=device, detach=detach,
                   clone=clone, stop_early=stop_early, arch=arch)
