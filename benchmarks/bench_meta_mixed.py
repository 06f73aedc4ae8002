"""Side-by-side benchmark: meta-analysis pooling and the mixed-effects mega-analysis vs peers.

1. ``meta.pool`` REML (and DL) on 100,000 features x 10 sites vs PyMARE's
   ``VarianceBasedLikelihoodEstimator`` / ``DerSimonianLaird`` (skipped with a message when
   PyMARE is not installed; it is a benchmark-only dependency: ``pip install pymare``).
2. ``mixed.fit`` random intercept (REML) on 1,000 features x 500 subjects x 10 sites vs a
   statsmodels ``MixedLM`` loop; the loop is timed on a subset and extrapolated linearly.
3. The same with a correlated random slope of age, ``(1 + age | site)``.

Time is wall-clock (``time.perf_counter``), memory the tracemalloc peak of a separate run (numpy
reports its buffers to tracemalloc). Prints a markdown table; ``--out`` also writes it with the
command and the machine load.

    python benchmarks/bench_meta_mixed.py --out benchmarks/results/meta_mixed.md
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dmriharmony.harmonizers import meta, mixed


def measure(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, float, Any]:
    """Best wall time of ``repeat`` runs, tracemalloc peak (MiB) of one more run, last result."""
    best = np.inf
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return best, peak / 2**20, out


def meta_data(p: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.02, 0.2, (k, p))
    y = rng.normal(0.3, np.sqrt(v + rng.choice([0.0, 0.01, 0.05, 0.3], p)))
    return y, v


def mixed_data(p: int, n: int, n_sites: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    site = rng.integers(0, n_sites, n)
    age = (rng.uniform(20, 80, n) - 50) / 10
    dx = rng.choice(["CN", "PT"], n)
    sex = rng.choice(["F", "M"], n)
    b0 = rng.normal(0, 0.8, (n_sites, p))
    b1 = rng.normal(0, 0.2, (n_sites, p))
    y = (0.1 * age[:, None] + 0.3 * (dx == "PT")[:, None] + b0[site] + b1[site] * age[:, None]
         + rng.normal(0, 1, (n, p)))
    cols = pd.DataFrame(y, columns=[f"v{j}" for j in range(p)])
    return pd.concat([pd.DataFrame({"site": [f"s{s}" for s in site], "age": age, "sex": sex,
                                    "dx": dx}), cols], axis=1)


def bench_meta(p: int, k: int, rows: list[dict]) -> None:
    y, v = meta_data(p, k)
    try:
        from pymare.estimators import DerSimonianLaird, VarianceBasedLikelihoodEstimator
    except ImportError:
        print("PyMARE not installed: peer skipped (pip install pymare)", file=sys.stderr)
        DerSimonianLaird = VarianceBasedLikelihoodEstimator = None  # noqa: N806
    for method in ("REML", "ML", "DL", "PM"):
        t_ours, m_ours, res = measure(lambda m=method: meta.pool(y, v, method=m), repeat=3)
        row = {"task": f"meta.pool {method}, {p:,} features x {k} sites", "ours_s": t_ours,
               "ours_MiB": m_ours}
        if method == "PM":
            row.update(peer="PyMARE has no Paule-Mandel")
        elif VarianceBasedLikelihoodEstimator is not None:
            x = np.ones((k, 1))

            def peer(m: str = method, x: np.ndarray = x) -> Any:
                est = (VarianceBasedLikelihoodEstimator(method=m, small_sample_correction="wald")
                       if m != "DL" else DerSimonianLaird(small_sample_correction="wald"))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return est.fit(y=y, v=v, X=x).summary()

            t_peer, m_peer, summ = measure(peer, repeat=1)
            tau2 = np.ravel(summ.tau2)
            est = np.ravel(summ.get_fe_stats()["est"])
            row.update(peer="PyMARE " + _version("pymare"), peer_s=t_peer, peer_MiB=m_peer,
                       agreement=f"max abs diff tau2 {np.abs(tau2 - res.tau2).max():.1e}, "
                                 f"estimate {np.abs(est - res.estimate).max():.1e}")
        else:
            row.update(peer="PyMARE (not installed)")
        rows.append(row)


def bench_mixed(p: int, n: int, n_sites: int, subset: int, slope: str | None,
                rows: list[dict]) -> None:
    data = mixed_data(p, n, n_sites)
    feats = [f"v{j}" for j in range(p)]
    fixed = "age + sex + dx"
    t_ours, m_ours, fit = measure(
        lambda: mixed.fit(data, feats, fixed=fixed, site="site", random_slope=slope,
                          progress=False), repeat=1)
    label = "(1 \\| site)" if slope is None else f"(1 + {slope} \\| site)"
    row = {"task": f"mixed.fit REML {label}, {p:,} features x {n} subjects x {n_sites} sites",
           "ours_s": t_ours, "ours_MiB": m_ours}
    try:
        import statsmodels.formula.api as smf
    except ImportError:
        row.update(peer="statsmodels (not installed)")
        rows.append(row)
        return

    def loop(cols: list[str]) -> list[Any]:
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for c in cols:
                model = smf.mixedlm(f"{c} ~ {fixed}", data, groups="site",
                                    re_formula=None if slope is None else f"~{slope}")
                out.append(model.fit(reml=True))
        return out

    t0 = time.perf_counter()
    fits = loop(feats[:subset])
    t_sub = time.perf_counter() - t0
    tracemalloc.start()
    loop(feats[:2])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    coef_d, var_d, ll_d = [], [], []
    for c, r in zip(feats[:subset], fits):
        fe = r.fe_params
        coef_d.append(np.max(np.abs(fit.coef.loc[c, fe.index] - fe) / np.abs(fe)))
        sv = fit.sigma2_site[c] if slope is None else fit.varcomp.loc[c, "var_intercept"]
        var_d.append(abs(sv / np.asarray(r.cov_re)[0, 0] - 1))
        ll_d.append(fit.loglik[c] - r.llf)
    row.update(
        peer=f"statsmodels {_version('statsmodels')} MixedLM loop (timed on {subset}, "
             f"x{p / subset:.0f} extrapolated)",
        peer_s=t_sub * p / subset, peer_MiB=peak / 2**20,
        agreement=f"median rel diff coef {np.median(coef_d):.1e}, site var "
                  f"{np.median(var_d):.1e}; logLik ours - sm: min {np.min(ll_d):.1e}, "
                  f"max {np.max(ll_d):.1e}",
    )
    rows.append(row)


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


def table(rows: list[dict]) -> str:
    head = ("| task | ours (s) | ours peak (MiB) | peer | peer (s) | peer peak (MiB) | "
            "speed-up | agreement |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        peer_s, peer_m = r.get("peer_s"), r.get("peer_MiB")
        ratio = f"{peer_s / r['ours_s']:.1f}x" if peer_s else "-"
        ps = "" if peer_s is None else f"{peer_s:.2f}"
        pm = "" if peer_m is None else f"{peer_m:.0f}"
        lines.append(
            f"| {r['task']} | {r['ours_s']:.3f} | {r['ours_MiB']:.0f} | {r.get('peer', '-')} | "
            f"{ps} | {pm} | {ratio} | {r.get('agreement', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meta-features", type=int, default=100_000)
    ap.add_argument("--meta-sites", type=int, default=10)
    ap.add_argument("--mixed-features", type=int, default=1000)
    ap.add_argument("--subjects", type=int, default=500)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--subset", type=int, default=20, help="statsmodels fits actually timed")
    ap.add_argument("--no-slope", action="store_true", help="skip the random-slope comparison")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    rows: list[dict] = []
    bench_meta(args.meta_features, args.meta_sites, rows)
    bench_mixed(args.mixed_features, args.subjects, args.sites, args.subset, None, rows)
    if not args.no_slope:
        bench_mixed(args.mixed_features, args.subjects, args.sites, max(args.subset // 2, 2),
                    "age", rows)
    text = table(rows)
    print(text)
    if args.out:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
        body = (
            "# Meta-analysis and mixed-model benchmark\n\n"
            f"Command: `{cmd}`\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, numpy {np.__version__}.\n"
            f"Load average before: {', '.join(f'{x:.2f}' for x in load_before)}; "
            f"`uptime` after: {uptime} (other jobs share the CPUs: absolute times are noisy, "
            "the ratios less so).\n\n"
            f"{text}\n\n"
            "Notes: peak memory is the tracemalloc peak of one extra run (for the statsmodels "
            "loop: of two fits; each fit is independent, so it does not grow with the loop). "
            "The statsmodels time is the subset's time scaled linearly to all features. "
            "statsmodels' default optimiser sometimes stops short of the optimum (our logLik "
            "is then higher), hence the agreement column reports medians and the logLik range.\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(body)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
