"""Parameter accounting: what K resolutions cost against K independent models (the paper's Table 4 row)."""
from __future__ import annotations

from .family import ResolutionFamily, res_key


def count_parameters(family: ResolutionFamily) -> dict:
    """Learned parameters (γ, β, weights) and stored statistics, shared vs per patch."""
    r0 = family.resolutions[0]
    patch = family._patch_entries(res_key(r0))
    patch_params = sum(t.numel() for n, t in patch.items() if n.endswith((".weight", ".bias")))
    patch_stats = sum(t.numel() for n, t in patch.items() if n.endswith(("running_mean", "running_var")))
    shared = family._shared_entries()
    shared_params = sum(p.numel() for p in family.shared_parameters())
    shared_stats = sum(t.numel() for n, t in shared.items() if n.endswith(("running_mean", "running_var")))
    k = len(family.resolutions)
    one_model = shared_params + patch_params
    family_params = shared_params + k * patch_params
    return {
        "shared": shared_params,
        "per_patch": patch_params,
        "per_patch_statistics": patch_stats,
        "shared_statistics": shared_stats,
        "k": k,
        "family": family_params,
        "one_model": one_model,
        "k_independent": k * one_model,
        "family_over_one_model": family_params / one_model,
        "family_over_k_independent": family_params / (k * one_model),
        "classifier_shared": family.classifier_kind == "shared",
    }


def format_parameter_table(counts: dict) -> str:
    k = counts["k"]
    rows = [
        ("shared (all but BatchNorm" + (")" if counts["classifier_shared"] else " and the head)"),
         counts["shared"], counts["shared_statistics"]),
        ("one patch (BatchNorm γ, β" + (")" if counts["classifier_shared"] else ", classifier)"),
         counts["per_patch"], counts["per_patch_statistics"]),
        (f"family of {k} resolutions", counts["family"],
         counts["shared_statistics"] + k * counts["per_patch_statistics"]),
        ("one model (plain)", counts["one_model"], counts["shared_statistics"] + counts["per_patch_statistics"]),
        (f"{k} independent models", counts["k_independent"],
         k * (counts["shared_statistics"] + counts["per_patch_statistics"])),
    ]
    w = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':<{w}}{'parameters':>12}  {'+ BN statistics':>16}"]
    lines += [f"{name:<{w}}{p:>12,}  {s:>16,}" for name, p, s in rows]
    lines.append(f"{'family / one model':<{w}}{counts['family_over_one_model']:>11.3f}x")
    lines.append(f"{f'family / {k} independent':<{w}}{counts['family_over_k_independent']:>11.3f}x")
    return "\n".join(lines)
