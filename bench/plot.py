#!/usr/bin/env python3
"""Bar charts of the benchmarks' ratio tables (the `--plot FILE.png` of nbd-bench.py,
job-bench.py and rbd-bench.py).

Reads the Markdown report a benchmark prints: every table with a column whose header is a
ratio ("sluice-memory/nbdkit-memory", "sluice/qsd", ...) becomes one panel, one group of bars
per row, one bar per ratio column. Rows whose metric says "lower better" (CPU per operation)
are left out, so that every bar reads the same way: above 1.0 sluice is ahead. Dashed lines
mark 1.0 (level) and 1.3 (the issues' target).

  python3 bench/plot.py results.md chart.png      # a report saved with --out
  python3 bench/plot.py --self-test               # what scripts/test.sh runs

matplotlib is the plotting library because it is what Python users have and it writes PNG
without a display (the Agg backend); pip installs it (scripts/test.sh does).
"""

import math
import os
import sys
import tempfile

TARGET = 1.3


def parse_tables(md):
    """The report's ratio tables: [(section title, ratio names, [(label, [ratio or None])])]."""
    tables, section, lines = [], "", md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if not (line.startswith("|") and i + 1 < len(lines)
                and set(lines[i + 1].strip()) <= set("|-: ")):
            i += 1
            continue
        header = [c.strip() for c in line.strip("|").split("|")]
        i += 2
        body = []
        while i < len(lines) and lines[i].strip().startswith("|"):
            body.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
            i += 1
        ratio_cols = [k for k, h in enumerate(header) if "/" in h and k > 0]
        if not ratio_cols:
            continue
        label_cols = [k for k, h in enumerate(header) if h in ("row", "metric")] or [0]
        rows = []
        for cells in body:
            if len(cells) != len(header):
                continue
            label = " ".join(cells[k] for k in label_cols)
            if "lower better" in label:
                continue
            rows.append((label.replace(" (higher better)", ""),
                         [number(cells[k]) for k in ratio_cols]))
        if any(v is not None for _, vs in rows for v in vs):
            tables.append((section, [header[k] for k in ratio_cols], rows))
    return tables


def number(cell):
    cell = cell.strip("* x")
    try:
        v = float(cell)
    except ValueError:
        return None
    return v if math.isfinite(v) and v > 0 else None


def plot(md, png, title=None):
    """Draws the ratio tables of report `md` into `png`. Returns the number of bars drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = parse_tables(md)
    if not tables:
        raise SystemExit("plot: the report has no ratio table")
    heights = [max(1.5, 0.45 * len(rows) * max(1, len(names)) + 1.2)
               for _, names, rows in tables]
    fig, axes = plt.subplots(len(tables), 1, figsize=(12, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    bars = 0
    for ax, (section, names, rows) in zip(axes[:, 0], tables):
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ys = [i + j * width for i in range(len(rows))]
            vals = [vs[j] or 0 for _, vs in rows]
            ax.barh(ys, vals, height=width, label=name)
            for y, v in zip(ys, vals):
                if v:
                    ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
                    bars += 1
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(rows))])
        ax.set_yticklabels([label for label, _ in rows], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(TARGET, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(section, fontsize=10)
        ax.set_xlabel("ratio (sluice / peer; above 1 is sluice ahead; dashed: 1.3 target)",
                      fontsize=8)
        top = max([v for _, vs in rows for v in vs if v] + [TARGET])
        ax.set_xlim(0, top * 1.15)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    head = md.splitlines()[:4]
    first = head[0].lstrip("# ").strip() if head else ""
    load = next((line.strip() for line in head if " load " in line), "")
    fig.suptitle(title or (first + ("\n" + load if load else "")), fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return bars


def save(md, png):
    """`--plot` of the benchmarks: draws report `md` into `png`, or says why it cannot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot: matplotlib is missing (python3 -m pip install matplotlib)", file=sys.stderr)
        return
    n = plot(md, png)
    print(f"plot: {n} bars in {png}", file=sys.stderr)


SAMPLE = """# sluice NBD bench: 512M exports

## Random 4 KiB (fio nbd engine)

| row | metric | sluice-memory | nbdkit-memory | sluice-memory/nbdkit-memory |
|---|---|---:|---:|---:|
| randread-qd1 | IOPS | 20.1k | 18.3k | 1.10 |
| randread-qd1 | CPU us/op (lower better) | 12.1 | 14.0 | 0.86 |
| randread-qd32 | IOPS | 140k | 90k | 1.56 |

## Jobs

| row | metric | sluice | qsd | sluice/qsd |
|---|---|---:|---:|---:|
| mirror-idle | s to READY | 2.0 | 3.1 | 1.55 |
| backup-full | s | 1.0 | 1.0 | - |
"""


def self_test():
    tables = parse_tables(SAMPLE)
    assert [t[0] for t in tables] == ["Random 4 KiB (fio nbd engine)", "Jobs"], tables
    assert tables[0][2] == [("randread-qd1 IOPS", [1.10]), ("randread-qd32 IOPS", [1.56])]
    assert tables[1][2][1] == ("backup-full s", [None])
    with tempfile.TemporaryDirectory() as d:
        png = os.path.join(d, "t.png")
        assert plot(SAMPLE, png) == 3
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    print("plot.py: self-test passed")


def main(argv):
    if argv == ["--self-test"]:
        self_test()
        return 0
    if len(argv) != 2:
        print(__doc__.strip().split("\n\n")[2], file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        md = f.read()
    n = plot(md, argv[1])
    print(f"plot.py: {n} bars in {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
