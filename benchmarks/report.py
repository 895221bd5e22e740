"""Markdown tables and the target checks, from the results dict that run.py builds."""

# Ratios to autograd (same run) that issue 12 asks for, per regime (small = the two small
# reference sizes, medium = [784,256,256,10], gemm = widths >= 1024); None: no target there.
STEP_TARGETS = {
    "natural": {"small": 0.85, "medium": 0.90, "gemm": 1.0},
    "mlp": {"small": 0.70, "medium": 0.90, "gemm": 1.0},
    "per_layer": {"small": 0.85, "medium": 0.90, "gemm": 1.0},
    "backprop": {"small": 0.50, "medium": None, "gemm": None},
}
DIGITS_TIME_TARGET = 0.70  # the natural path's whole digits run / sklearn's
DIGITS_ACC_POINTS = 1.0  # ... at the same test accuracy within this many points
GRAD_TOL = 1e-5  # float32 grads of one step, relative to autograd
MANUALBP = ("per_layer", "natural", "mlp", "backprop", "per_layer_py", "natural_py", "mlp_py",
            "backprop_py", "per_layer_general", "mlp_general", "per_layer_bare", "natural_bare",
            "mlp_bare", "backprop_bare")
PATHS = ("per_layer", "natural", "mlp", "backprop")


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:,.0f}"


def _size(cfg: dict) -> str:
    return "[" + ",".join(str(s) for s in cfg["sizes"]) + "]"


def _ratio(cfg: dict, name: str, key: str) -> float | None:
    return cfg["ratios"].get(name, {}).get(key)


def step_table(configs: list[dict]) -> str:
    rows = ["| sizes | act | batch | autograd us/step | floor x | compile x | per-layer x "
            "| natural x | MLP x | backprop x | saved-new per-layer x / MLP x "
            "| peak per-layer x / MLP x / backprop x | grad rel err manualbp / compile |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in configs:
        ag = c["variants"]["autograd"]["step"][c["stat"] + "_s"] * 1e6
        v = c["variants"]
        err = max(v[n]["check"]["grad_rel_err"] for n in v if n in MANUALBP)
        cerr = f"{v['compile']['check']['grad_rel_err']:.1e}" if "compile" in v else "-"
        rows.append(
            f"| {_size(c)} | {c['activation']} | {c['batch']} | {ag:,.0f} | {_x(c.get('floor_x'))} "
            f"| {_x(_ratio(c, 'compile', 'step'))} | {_x(_ratio(c, 'per_layer', 'step'))} "
            f"| {_x(_ratio(c, 'natural', 'step'))} "
            f"| {_x(_ratio(c, 'mlp', 'step'))} | {_x(_ratio(c, 'backprop', 'step'))} "
            f"| {_x(_ratio(c, 'per_layer', 'saved_new'))} / {_x(_ratio(c, 'mlp', 'saved_new'))} "
            f"| {_x(_ratio(c, 'per_layer', 'peak'))} / {_x(_ratio(c, 'mlp', 'peak'))} "
            f"/ {_x(_ratio(c, 'backprop', 'peak'))} "
            f"| {err:.1e} / {cerr} |"
        )
    return "\n".join(rows)


def native_table(configs: list[dict]) -> str:
    """Per path: native x autograd, its bare twin's (the native nodes with none of manualbp's
    Python around them), the path's distance to the floor, the Python fallback (core paused)
    and the fallback without the lean eager twins (general Functions only)."""
    rows = ["| sizes | act | floor us | floor x | " + " | ".join(
        f"{p} native x / bare x / x floor / py x" for p in PATHS)
        + " | general-only per-layer x / MLP x |",
        "|---|---|---:|---:|" + "---:|" * (len(PATHS) + 1)]
    for c in configs:
        fl = c.get("floor")
        cells = []
        for p in PATHS:
            r = _ratio(c, p, "step")
            to_floor = None if r is None or not c.get("floor_x") else r / c["floor_x"]
            cells.append(f"{_x(r)} / {_x(_ratio(c, p + '_bare', 'step'))} / {_x(to_floor)} "
                         f"/ {_x(_ratio(c, p + '_py', 'step'))}")
        general = (f"{_x(_ratio(c, 'per_layer_general', 'step'))} / "
                   f"{_x(_ratio(c, 'mlp_general', 'step'))}")
        us = "-" if fl is None else f"{fl[c['stat'] + '_s'] * 1e6:,.0f}"
        rows.append(f"| {_size(c)} | {c['activation']} | {us} | {_x(c.get('floor_x'))} | "
                    + " | ".join(cells)
                    + f" | {general} |")
    return "\n".join(rows)


def epoch_table(configs: list[dict]) -> str:
    rows = ["| sizes | act | batch | batches | autograd ms/epoch | compile x | per-layer x "
            "| MLP x | backprop x |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in configs:
        if "epoch" not in c["variants"]["autograd"]:
            continue
        ag = c["variants"]["autograd"]["epoch"][c["stat"] + "_s"] * 1e3
        rows.append(
            f"| {_size(c)} | {c['activation']} | {c['batch']} | {c['epoch_batches']} | {ag:,.2f} "
            f"| {_x(_ratio(c, 'compile', 'epoch'))} | {_x(_ratio(c, 'per_layer', 'epoch'))} "
            f"| {_x(_ratio(c, 'mlp', 'epoch'))} | {_x(_ratio(c, 'backprop', 'epoch'))} |"
        )
    return "\n".join(rows) if len(rows) > 2 else ""


def memory_table(configs: list[dict], names: list[str]) -> str:
    head = " | ".join(f"{n} saved all/new" for n in names)
    peak = " | ".join(f"{n} peak" for n in names)
    rows = [f"| sizes | act | batch | {head} | {peak} |",
            "|---|---|---:|" + "---:|" * (2 * len(names))]
    for c in configs:
        v = c["variants"]
        saved = " | ".join(
            f"{_kib(v[n]['saved']['all'])} / {_kib(v[n]['saved']['new'])}" if n in v else "-"
            for n in names)
        peaks = " | ".join(_kib(v[n]["peak_bytes"]) if n in v else "-" for n in names)
        rows.append(f"| {_size(c)} | {c['activation']} | {c['batch']} | {saved} | {peaks} |")
    return "\n".join(rows)


def digits_table(d: dict, stat: str = "median") -> str:
    sk, key = d.get("sklearn"), stat + "_s"
    rows = [f"| run | time s ({stat}) | x sklearn | test acc % (mean) |", "|---|---:|---:|---:|"]
    for kind in ("sklearn", "autograd", "per_layer", "natural", "mlp", "backprop", "natural_py"):
        if kind not in d:
            continue
        r = d[kind]
        ratio = r[key] / sk[key] if sk else None
        rows.append(f"| {kind} | {r[key]:.3f} | {_x(ratio)} | {r['test_acc_mean']:.2f} |")
    return "\n".join(rows)


def targets(configs: list[dict], digits: dict | None, stat: str = "median") -> list[dict]:
    """Every target the issue states that this run can check: where, check, value, limit, ok.

    Saved bytes are held to autograd's on "new" (what the graph alone keeps alive): a saved
    parameter or input costs no memory, and the "all" count is in the memory table.
    """
    out = []

    def add(where, check, value, limit, ok):
        out.append({"where": where, "check": check, "value": value, "limit": limit, "ok": ok})

    for c in configs:
        where = f"{_size(c)} {c['activation']} b{c['batch']} {c['dtype']}"
        for name, limits in STEP_TARGETS.items():
            r, limit = _ratio(c, name, "step"), limits.get(c["regime"])
            if r is not None and limit is not None:
                add(where, f"{name} step x", r, limit, r <= limit)
        for name in ("per_layer", "mlp"):
            r = _ratio(c, name, "saved_new")
            if r is not None:
                add(where, f"{name} saved-new x", r, 1.0, r <= 1.0)
        mine = [v["check"]["grad_rel_err"] for n, v in c["variants"].items() if n in MANUALBP]
        if c["dtype"] == "float32" and mine:  # compile's error is shown, not held to this
            add(where, "manualbp grad rel err", max(mine), GRAD_TOL, max(mine) <= GRAD_TOL)
    for kind in ("natural", "mlp", "backprop"):
        if digits and kind in digits and "sklearn" in digits:
            m, s = digits[kind], digits["sklearn"]
            r = m[stat + "_s"] / s[stat + "_s"]
            add("digits", f"{kind} time / sklearn", r, DIGITS_TIME_TARGET, r <= DIGITS_TIME_TARGET)
            gap = m["test_acc_mean"] - s["test_acc_mean"]
            add("digits", f"{kind} - sklearn acc (points)", gap, -DIGITS_ACC_POINTS,
                gap >= -DIGITS_ACC_POINTS)
    return out


def targets_table(checks: list[dict]) -> str:
    """One row per config, one column per check; each cell is the value and ok / MISS."""
    cols = list(dict.fromkeys(t["check"] for t in checks))
    rows_ = dict.fromkeys(t["where"] for t in checks)
    cells = {(t["where"], t["check"]): t for t in checks}
    heads = []
    for col in cols:
        limits = list(dict.fromkeys(t["limit"] for t in checks if t["check"] == col))
        heads.append(f"{col} (limit {' / '.join(f'{x:g}' for x in limits)})")
    rows = ["| where | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(cols)]
    for where in rows_:
        line = []
        for col in cols:
            t = cells.get((where, col))
            line.append("" if t is None else
                        f"{t['value']:.{'1e' if 'grad' in col else '2f'}} "
                        f"{'ok' if t['ok'] else '**MISS**'}")
        rows.append(f"| {where} | " + " | ".join(line) + " |")
    missed = sum(not t["ok"] for t in checks)
    rows.append(f"\n{len(checks) - missed} of {len(checks)} checks met.")
    return "\n".join(rows)
