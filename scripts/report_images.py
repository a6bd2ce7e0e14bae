"""Rule `report_images`: coadd thumbnails, DIASource cutout triplets, light curves."""

import numpy as np
from astropy.io import fits
from matplotlib.figure import Figure

from diffim.io import atomic_path, read_exposure, read_table
from diffim.plots import plot_coadd, plot_cutouts, plot_light_curves
from diffim.runlog import setup_logging

CUTOUT = 31  # pixels on a side


def save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def coadd_figure(coadd_paths) -> Figure:
    images, titles = [], []
    for p in coadd_paths:
        exp = read_exposure(p)
        images.append(exp.image)
        titles.append(f"{exp.meta.get('BAND')} patch {exp.meta.get('PATCH')} "
                      f"({exp.meta.get('NINPUTS')} visits)")
    if not images:
        return plot_coadd(np.zeros((10, 10)), title="no coadd")
    # one figure per coadd would crowd the report: show them side by side
    fig = Figure(figsize=(4.5 * len(images), 4.5), layout="constrained")
    for i, (img, title) in enumerate(zip(images, titles)):
        sub = plot_coadd(img, title=title)
        ax = fig.add_subplot(1, len(images), i + 1)
        canvas_img = sub.axes[0].images[0]
        ax.imshow(canvas_img.get_array(), origin="lower", cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def cutout(array, x, y, half):
    out = np.full((2 * half + 1, 2 * half + 1), np.nan, np.float32)
    ix, iy = int(round(x)), int(round(y))
    y0, y1 = max(iy - half, 0), min(iy + half + 1, array.shape[0])
    x0, x1 = max(ix - half, 0), min(ix + half + 1, array.shape[1])
    out[y0 - iy + half:y1 - iy + half, x0 - ix + half:x1 - ix + half] = array[y0:y1, x0:x1]
    return out


def triplets(rows, diff_paths, calexp_paths) -> Figure:
    """Science / template / difference stamps of the DIASources in ``rows``."""
    half = CUTOUT // 2
    by_stem = {p.split("/")[-1][: -len(".fits")]: p for p in diff_paths}
    calexps = {p.split("/")[-1][: -len(".fits")]: p for p in calexp_paths}
    stacks, labels = ([], [], []), []
    for r in rows.itertuples(index=False):
        path = by_stem.get(f"v{r.visit}-d{r.detector}")
        if path is None:
            continue
        with fits.open(path) as hdul, fits.open(calexps[f"v{r.visit}-d{r.detector}"]) as cal:
            diff, template = hdul["IMAGE"].data, hdul["TEMPLATE"].data
            science = cal["IMAGE"].data * np.float32(cal[0].header["NJYPERE"])  # nJy
            for stack, arr in zip(stacks, (science, template, diff)):
                stack.append(cutout(arr, r.x, r.y, half))
        labels.append(f"v{r.visit} S/N {r.snr:.0f}")
    if not labels:
        return plot_coadd(np.zeros((10, 10)), title="no DIASources")
    arrays = [np.concatenate(s, axis=0) for s in stacks]
    positions = [(half, half + i * CUTOUT) for i in range(len(labels))]
    return plot_cutouts(*arrays, positions, size=CUTOUT, labels=labels)


def main(inp, out, params, log=None):
    logger = setup_logging(log)
    save(coadd_figure(inp.coadds), out.coadd)
    dia = read_table(inp.dia_sources)
    n = params.n_cutouts
    brightest = dia.sort_values("snr", ascending=False).head(n)
    rng = np.random.default_rng(params.seed)
    random = dia.iloc[np.sort(rng.choice(len(dia), size=min(n, len(dia)), replace=False))]
    save(triplets(brightest, inp.diffs, inp.calexps), out.brightest)
    save(triplets(random, inp.diffs, inp.calexps), out.random)
    save(plot_light_curves(read_table(inp.forced), read_table(inp.objects),
                           n=params.n_light_curves), out.light_curves)
    logger.info("report images written")


if "snakemake" in globals():
    main(snakemake.input, snakemake.output, snakemake.params, snakemake.log[0])
