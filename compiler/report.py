"""Human-readable tables for `moec report`."""

from __future__ import annotations


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n) if float(n).is_integer() else f"{n:.4g}"


def _count(n: float) -> str:
    """Thousands separators; expected (fractional) values with one decimal."""
    n = round(n, 6)  # sums of expected values carry float noise
    return f"{int(n):,}" if float(n).is_integer() else f"{n:,.1f}"


def _by_layer(rows: list[tuple[int, list[str]]]) -> list[str]:
    """Lines of per-layer rows ``(layer index, its lines)``, each line led by the layer index; a run
    of consecutive layers with the same lines is shown once, led by the range ("3-60")."""
    runs: list[list] = []  # [first, last, lines]
    for index, texts in rows:
        if runs and runs[-1][1] == index - 1 and runs[-1][2] == texts:
            runs[-1][1] = index
        else:
            runs.append([index, index, texts])
    label = {True: "{}", False: "{}-{}"}
    return [f"{label[first == last].format(first, last):>{_LAYER}}  {text}"
            for first, last, texts in runs for text in texts]


_LAYER = 7  # width of the layer column: a range such as "100-159"


def _routing_line(g: dict) -> str:
    ept = g["experts_per_token"]
    note = "" if g["causal"] else "  NON-CAUSAL: depends on other tokens of the routing group"
    note += f"  ({g['of']})" if "of" in g else ""
    return f"{g['router']:<14} {ept['expected']:>6} ({ept['min']}..{ept['max']}){note}"


def format_report(a: dict) -> str:
    mods = a["modalities"]
    lines = [f"model {a['model']}", ""]
    head = f"{'layer':>{_LAYER}}  {'block':<16} {'kind':<5} {'params':>10}"
    for m in mods:
        head += f"  {'active/' + m:>14} {'FLOPs/' + m:>12}"
    lines.append(head)
    lines.append("-" * len(head))
    rows = []
    for layer in a["layers"]:
        row = f"{layer['block'][:16]:<16} {layer['kind']:<5} {_human(layer['params']):>10}"
        for m in mods:
            row += f"  {_human(layer['active_params_per_token'][m]):>14} {_human(layer['flops_per_token'][m]):>12}"
        rows.append((layer["index"], [row]))
    lines += _by_layer(rows)
    lines.append("-" * len(head))
    total = f"{'total':>{_LAYER}}  {'':<16} {'':<5} {_human(a['params']['total']):>10}"
    for m in mods:
        total += f"  {_human(a['params']['active_per_token'][m]):>14} {_human(a['flops_per_token'][m]):>12}"
    lines.append(total)
    lines.append("")
    lines.append(f"parameters: {a['params']['total']:,}")
    for m in mods:
        lines.append(f"  {m}: {_count(a['params']['active_per_token'][m])} active per token, "
                     f"{_count(a['flops_per_token'][m])} FLOPs per token, "
                     f"{_count(a['activation_bytes_per_token'][m])} activation bytes per token")
    fused = [layer for layer in a["layers"] if "fusion" in layer]
    if fused:
        f0 = fused[0]["fusion"]
        lines.append("")
        lines.append(f"MoE layers: kernel launches and dispatch memory (padding at {f0['padding_overhead_at_tokens']} "
                     "tokens per group, uniform / all-to-the-same-k routing)")
        head = f"{'layer':>{_LAYER}}  {'launches':>8} {'unfused':>8} {'copy B/tok':>10} {'index B/tok':>11}"
        for b in ("16", "64", "128"):
            head += f"  {'pad@' + b:>13}"
        lines.append(head)
        rows = []
        for layer in fused:
            f = layer["fusion"]
            row = (f"{f['kernel_launches']:>8} {f['kernel_launches_unfused']:>8} "
                   f"{f['permuted_copy_bytes_per_token']:>10} {f['index_bytes_per_token']:>11}")
            for b in ("16", "64", "128"):
                p = f["padding_overhead"][b]
                row += f"  {100 * p['uniform']:>5.1f}%/{100 * p['skewed']:>5.1f}%"
            rows.append((layer["index"], [row]))
        lines += _by_layer(rows)
    routed = [(layer["index"], [_routing_line(g) for g in layer["routing"]])
              for layer in a["layers"] if layer.get("routing")]
    if routed:
        lines.append("")
        lines.append("routing (experts per token: expected at uniform scores, min..max)")
        lines += _by_layer(routed)
    deep = [layer for layer in a["layers"] if "depth" in layer]
    if deep:
        lines.append("")
        rows = []
        lines.append("Mixture-of-Depths (share of each sequence's candidate tokens a layer processes; the others "
                     "skip it; NON-CAUSAL: a token's choice depends on the other tokens of its sequence)")
        for layer in deep:
            dep = layer["depth"]
            rows.append((layer["index"], [f"keeps {dep['ratio']:.3f} of {', '.join(dep['modalities'])} tokens"]))
        lines += _by_layer(rows)
    if "recurrent_router" in a:
        r = a["recurrent_router"]
        lines.append("")
        lines.append(f"recurrent router: {r['cell']}(hidden = {r['hidden']}, projection = {r['projection']}) over "
                     f"{r['layers']} MoE layers: cell {r['cell_params']:,} parameters (shared), projections "
                     f"{r['projection_params']:,} parameters, {r['flops_per_token']:,} FLOPs per token")
    if "ternary_weights" in a:
        t = a["ternary_weights"]
        lines.append("")
        lines.append(f"ternary expert weights: {t['params']:,} entries in {{-1, 0, 1}}: "
                     f"{_human(t['bytes_16bit'])}B at 16 bit, {_human(t['bytes_2bit_packed'])}B packed at 2 bit, "
                     f"{_human(t['bytes_log2_3_bound'])}B at the log2(3)-bit bound (plus one scale per expert matrix)")
    lines.append("")
    lines.append("FLOPs = 2 x multiply-accumulates of weight GEMMs per token (forward); attention's "
                 "context-length terms, norms and activations are not counted.")
    return "\n".join(lines)
