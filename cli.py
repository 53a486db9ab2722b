"""The `sd` command: `sd generate --prompt "..."` renders images with Stable Diffusion 1.5."""

import csv
import itertools
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
from click.core import ParameterSource

from sd.files import hashes
from sd.control import FIELD_NAME as CONTROLNET_FIELD, PREPROCESSORS, ControlNetUnit, cached_controlnets
from sd.batch import Job, save_png
from sd.cluster import render_batch
from sd.prompts.embeddings import Embedding, infotext_name, load_embeddings
from sd.errors import SDError, counted
from sd.grid import contact_sheet, labelled_grid
from sd.hires import DEFAULT_UPSCALER, UPSCALERS, hires_target
from sd.inpaint import check_mask_has_image, read_mask
from sd.kernels import forced_by_environment
from sd.files.lora import LoraLibrary, prompt_loras, read_lora
from sd.memory import Render, plan_vae_tiling
from sd.files.metadata import read_infotext_of
from sd.files.loader import check_vae, image_size, read_controlnet
from sd.pipeline import CHECKPOINT_HELP, DEMO_NAME, cached_models, find_checkpoint, generate, pick_device, read_image
from sd.precision import DTYPE_NAMES, DTYPES, compute_dtype, weights_dtype
from sd.sampling.samplers import SAMPLERS, karras_by_default
from sd.prompts.conditioning import EMPHASIS_MODES
from sd.settings import COMMAND_DEFAULTS, MAX_CLIP_SKIP, MAX_SEED, RANDOM_SEEDS, Infotext, Settings, read_infotext, split_infotext

SLUG_LENGTH = 60
INTERRUPTED_EXIT_CODE = 130  # what shells report for a command stopped by Ctrl+C


class Group(click.Group):
    """Prints a user-fixable problem (SDError) as one line and exits with its code: 2, like a usage error, or 1
    for an image without settings; a bad option (click's usage error) too, as one line, exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SDError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(error.exit_code)
        except click.UsageError as error:
            usage_error(ctx, error)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except (click.NoSuchOption, click.BadOptionUsage) as error:  # `sd --bogus`, before any command is invoked
            usage_error(ctx, error)


def usage_error(ctx: click.Context, error: click.UsageError):
    help_option = f" (see {error.ctx.command_path} --help)" if error.ctx is not None else ""
    click.echo(f"error: {error.format_message()}{help_option}", err=True)
    ctx.exit(error.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sd", message="%(prog)s %(version)s")
def main():
    """Stable Diffusion 1.5, from scratch in PyTorch."""
    forced_by_environment()  # a mistyped SD_KERNELS is one line before anything loads


def png_path(ctx, param, path: Path | None) -> Path | None:
    if path is not None and path.suffix.lower() != ".png":
        raise click.BadParameter(f"{path} must end in .png: the settings are stored in a PNG text chunk")
    return path


def yes_no(text: str) -> bool:
    if text.lower() not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
        raise ValueError(text)
    return text.lower() in ("yes", "true", "on", "1")


# the settings an X/Y plot can vary, by the names --xy takes (the options' names) -> how a value is read
AXES = {
    "prompt": str, "negative_prompt": str, "steps": int, "sampler": str, "karras": yes_no, "cfg": float, "seed": int,
    "width": int, "height": int, "strength": float, "eta": float, "mask_blur": int, "clip_skip": int, "emphasis": str,
    "hires_scale": float, "hires_upscaler": str, "hires_steps": int, "hires_strength": float, "hires_sampler": str,
}

VALUE_KINDS = {int: "a whole number", float: "a number", yes_no: "yes or no"}


@dataclass(frozen=True)
class Axis:
    """One axis of an X/Y plot: the setting, by the name --xy takes, and its values as given and as read."""

    name: str
    texts: list[str]
    values: list


@main.command("generate")
@click.option("--prompt", help="What to draw.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A batch: one prompt per line; blank lines and lines starting with # are skipped. The model is loaded once.")
@click.option("--from", "from_image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Render with the settings stored in this image by sd, AUTOMATIC1111 or stable-diffusion.cpp (PNG, JPEG, "
                   "WebP; see `sd info`); the options given here override them.")
@click.option("--negative-prompt", default="", help="What to steer away from (for every prompt).")
@click.option("--cfg", type=click.FloatRange(min=0), default=7.5, show_default=True,
              help="Classifier-free guidance scale: how closely to follow the prompt; 1 turns guidance off.")
@click.option("--steps", type=click.IntRange(min=1), default=COMMAND_DEFAULTS["steps"], show_default=True, help="Denoising steps.")
@click.option("--seed", type=click.IntRange(-1, MAX_SEED),
              help="Seed of the first image; image i of the batch (counting every image of every prompt, from 0) "
                   "uses seed + i. Default, or -1: a random seed, printed.")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default=COMMAND_DEFAULTS["sampler"], show_default=True,
              help="How each step removes noise.")
@click.option("--karras/--no-karras", default=None,
              help="Karras et al.'s spacing of noise levels (lms, euler, euler_a, heun, dpmpp_2m). "
                   "Default: on for dpmpp_2m (AUTOMATIC1111's DPM++ 2M Karras), off for the others.")
@click.option("--eta", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="ddim only: the share of fresh noise in each step (0 deterministic, 1 as much as DDPM).")
@click.option("--clip-skip", type=click.IntRange(1, MAX_CLIP_SKIP), default=1, show_default=True,
              help="Read the text encoder's n-th layer from the end (AUTOMATIC1111's Clip skip): 2 for fine-tunes trained so.")
@click.option("--emphasis", type=click.Choice(list(EMPHASIS_MODES)), default="original", show_default=True,
              help="How (word:1.2) and [word] weigh words, as AUTOMATIC1111: original (weights, then the mean restored), "
                   "no-norm (weights only), ignore (brackets dropped, no weights), none (brackets are text).")
@click.option("--embeddings", "embeddings_folder", type=click.Path(path_type=Path),
              help="A folder of textual-inversion embeddings (AUTOMATIC1111's .pt, kohya's .safetensors, diffusers' .bin or "
                   ".safetensors; subfolders too): a file's name without its extension is the word that stands for it in a "
                   "prompt. Default: data/embeddings/ where it exists.")
@click.option("--lora-dir", type=click.Path(path_type=Path),
              help="The folder of LoRA and LyCORIS files (kohya's, LyCORIS', diffusers' .safetensors, or .pt/.ckpt; subfolders "
                   "too) that <lora:NAME:MULTIPLIER> in a prompt names, NAME being a file's name without its extension; "
                   "<lora:NAME:TE:UNET> multiplies the text encoder's and the U-Net's changes apart. Default: data/lora/.")
@click.option("--lora", "lora_files", multiple=True, metavar="FILE[:MULTIPLIER]",
              help="A LoRA file to use with every prompt (as <lora:ITS-NAME:MULTIPLIER> added to the prompt, which the "
                   "image's settings record); MULTIPLIER defaults to 1. Repeat for several.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An image to redraw (image-to-image); it is resized to --width x --height.")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True),
              help="With --input: how much to change it; 1 redraws it completely. Default: 0.8, or 1 when an inpainting checkpoint repaints a --mask.")
@click.option("--mask", "mask_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --input: repaint only the white part of this image (inpainting), keep the black part. "
                   "Any mode; resized to the input image's size, whose aspect ratio it must have.")
@click.option("--mask-blur", type=click.IntRange(min=0), default=4, show_default=True,
              help="With --mask and an ordinary checkpoint: the blur radius in pixels of the edge where the original pixels, "
                   "pasted back, fade into the repainted ones; 0 for a hard edge.")
@click.option("--width", type=int, help="A multiple of 8, at least 64. Default: the model's own size (512 for SD 1.5, 64 for the demo model).")
@click.option("--height", type=int, help="A multiple of 8, at least 64. Default: the model's own size.")
@click.option("--hires-scale", type=float,
              help="Hires fix (AUTOMATIC1111's): render at --width x --height, upscale by this factor (int(side * scale), a "
                   "multiple of 8), and redraw with image-to-image. E.g. 2: 512x512 -> 1024x1024.")
@click.option("--hires-width", type=int, help="Hires fix to this width instead of a scale; without --hires-height the aspect ratio is kept.")
@click.option("--hires-height", type=int, help="Hires fix to this height; with --hires-width too, the upscale covers both and is cut at the center.")
@click.option("--hires-upscaler", type=click.Choice(list(UPSCALERS)), default=DEFAULT_UPSCALER, show_default=True,
              help="latent*: resize the latents (latent: bilinear, AUTOMATIC1111's default); lanczos, nearest: decode, resize the pixels, encode.")
@click.option("--hires-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Steps of the second pass; 0: --steps. They run as the last of a schedule of int(steps / hires strength): "
                   "20 at 0.7 run the last 20 of 28.")
@click.option("--hires-strength", type=click.FloatRange(0, 1, min_open=True), default=0.7, show_default=True,
              help="How much the second pass changes the upscaled image (AUTOMATIC1111's Denoising strength).")
@click.option("--hires-sampler", type=click.Choice(list(SAMPLERS)),
              help="The second pass's sampler, with its own noise levels (Karras's for dpmpp_2m). Default: --sampler's.")
@click.option("--control-net", "control_nets", multiple=True, type=click.Path(path_type=Path),
              help="A ControlNet for SD 1.5 in its original single-file layout (.pth or .safetensors, e.g. control_v11p_sd15_canny), "
                   "which guides the layout by --control-image. Repeat for several; the --control-* options below then take "
                   "one value for all, or one per ControlNet in the same order.")
@click.option("--control-image", "control_images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The map a --control-net follows (edges, depth, pose...), resized to the output size without keeping its "
                   "aspect ratio (AUTOMATIC1111's \"Just Resize\").")
@click.option("--control-strength", multiple=True, type=float, help="How strongly the ControlNet guides: its residuals' scale. Default 1.")
@click.option("--control-start", multiple=True, type=float, help="The share of the steps before the ControlNet starts guiding. Default 0.")
@click.option("--control-end", multiple=True, type=float, help="The share of the steps after which the ControlNet stops guiding. Default 1.")
@click.option("--control-preprocess", multiple=True, type=click.Choice(PREPROCESSORS),
              help="canny: Canny's edges of the control image (OpenCV's, as the original ControlNet finds them); none: "
                   "the image is the map already (depth and pose maps need their own models: make them elsewhere). Default none.")
@click.option("--canny-low", type=click.IntRange(min=0), default=100, show_default=True, help="Canny's lower threshold: weaker gradients are no edge.")
@click.option("--canny-high", type=click.IntRange(min=0), default=200, show_default=True, help="Canny's upper threshold: stronger gradients are edges.")
@click.option("--guess-mode", is_flag=True,
              help="The ControlNets guide the prompt's half of classifier-free guidance alone, their residuals scaled 0.1 up to 1 "
                   "from the first level to the middle block, as diffusers does (AUTOMATIC1111: \"ControlNet is more important\").")
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True, help="Images per prompt.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help=f"An SD 1.x .safetensors or .ckpt, or {DEMO_NAME} for the built-in demo model. Default: $SD_CHECKPOINT, "
                   "else data/v1-5-pruned-emaonly.safetensors or .ckpt, else the demo model.")
@click.option("--vae", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A VAE file to use instead of the checkpoint's own, e.g. vae-ft-mse-840000-ema-pruned.safetensors (.safetensors "
                   "or .ckpt; the original's names, bare or under first_stage_model., or diffusers'). The image's settings name "
                   "it (VAE, VAE hash); --from does not pick it, it warns where the image's differs.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="auto picks CUDA, then MPS, then the CPU.")
@click.option("--vae-tiling/--no-vae-tiling", default=None,
              help="Decode (and encode) in tiles of 512x512 pixels, whose memory does not grow with the image, blended "
                   "over their overlap as diffusers does. Default: only where a whole image would not fit in memory.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="auto", show_default=True,
              help="The weights' type. auto: fp16 on CUDA, bf16 on a CPU with bf16 instructions, else fp32. "
                   "On a CPU without them bf16 halves the memory but computes in fp32.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), callback=png_path,
              help="The PNG file to write. With more than one image, -1, -2, ... goes before .png (out-1.png, out-2.png).")
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path),
              help="The folder to write to, default outputs/, as INDEX-SEED-PROMPT.png (e.g. 00000-42-a-photo-of-a-cat.png). "
                   "Files already there are skipped: a stopped batch resumes when run again with the same --seed.")
@click.option("--overwrite", is_flag=True, help="Replace existing files instead of stopping (--output) or skipping them (--outdir).")
@click.option("--grid", is_flag=True, help="Also write the batch's images as one contact sheet, grid-NNNN.png beside them, "
                                           "in rows and columns near square, with the first image's settings.")
@click.option("--xy", nargs=2, metavar="X Y",
              help='An X/Y plot: every combination of two settings\' values, e.g. --xy "cfg=3,7.5,12" "steps=10,20", with one '
                   f"model load; each image is kept, and a grid-NNNN.png labels them. Settings: {', '.join(AXES)}. "
                   'Values are comma-separated; quote one holding a comma: "prompt=\\"a cat, red\\",a dog".')
@click.option("--ray", "ray_address", is_flag=False, flag_value="", metavar="[ADDRESS]",
              help='Render the batch on a Ray cluster (pip install "sd[ray]"): workers that each load the model once on '
                   "their own GPU (or CPUs) render the jobs; the images come back here. No ADDRESS: $RAY_ADDRESS, else the "
                   "cluster `ray start` joined this machine to, else Ray started here for the batch; auto: a cluster only; "
                   "or the head node's HOST:PORT.")
@click.option("--workers", type=click.IntRange(min=1), help="With --ray: how many workers. Default: as many as the cluster has room for.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), help="With --ray: each worker's GPUs. Default: 1 where the cluster has GPUs, else 0.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --ray: each worker's CPUs (on a CPU, its threads).")
def generate_command(prompt, prompts_file, from_image, negative_prompt, cfg, steps, seed, sampler, karras, eta, clip_skip,
                     emphasis, embeddings_folder, lora_dir, lora_files, input_path, strength, mask_path, mask_blur, width, height, hires_scale,
                     hires_width, hires_height, hires_upscaler, hires_steps, hires_strength, hires_sampler, control_nets, control_images, control_strength,
                     control_start, control_end, control_preprocess, canny_low, canny_high, guess_mode, num_images, checkpoint, vae, device, vae_tiling,
                     dtype, output, outdir, overwrite, grid, xy, ray_address, workers, gpus_per_worker, cpus_per_worker):
    """Render images from a prompt (or a file of prompts), optionally starting from an input image, optionally
    repainting only the masked part of it.

    Each PNG carries its settings in a `parameters` text chunk, in AUTOMATIC1111's format.
    """
    # Everything cheap is checked before the models load, so a mistake costs no waiting.
    options = dict(negative_prompt=negative_prompt, steps=steps, sampler=sampler, karras=karras, cfg=cfg, seed=seed,
                   width=width, height=height, strength=strength, eta=eta, mask_blur=mask_blur, clip_skip=clip_skip,
                   emphasis=emphasis, hires_scale=hires_scale, hires_width=hires_width, hires_height=hires_height,
                   hires_upscaler=hires_upscaler, hires_steps=hires_steps, hires_strength=hires_strength, hires_sampler=hires_sampler)
    units = control_units(control_nets, control_images, dict(strength=control_strength, start=control_start, end=control_end,
                                                             preprocess=control_preprocess), canny_low, canny_high, guess_mode)
    image = read_image_settings(from_image, given(options), input_path is not None) if from_image is not None else None
    settings = command_settings(image.settings if image else Settings(), given(options) if image else options)
    settings = replace(settings, controlnets=units)  # the image's own are files it names, not ones given here
    prompts = read_prompts(prompt, prompts_file, image.settings.prompt if image else None)
    ray_options = dict(workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
    if ray_address is None and given(ray_options):
        raise click.UsageError(f"--{next(iter(given(ray_options))).replace('_', '-')} is an option of --ray: add --ray")
    lora_paths, lora_tags = read_lora_options(lora_files)
    prompts = [prompt + lora_tags for prompt in prompts]
    if output is not None and outdir is not None:
        raise click.UsageError("give --output FILE or --outdir DIR, not both")
    axes = [read_axis(text) for text in xy] if xy else None
    if axes and (len(prompts) > 1 or num_images > 1):
        raise click.UsageError("--xy plots one prompt, one image per cell: leave out --prompts-file and --num-images")
    check_mask_has_image(mask_path, input_path)
    if settings.hires and input_path is not None:
        raise SDError("hires fix is text-to-image only, as in AUTOMATIC1111: leave out --input, or the hires options")
    device = pick_device(device) if ray_address is None else device  # Ray's workers pick their own
    checkpoint = find_checkpoint(checkpoint)
    if vae is not None:
        check_vae(vae, checkpoint)
    embeddings = load_embeddings(embeddings_folder)
    loras = LoraLibrary(lora_dir, lora_paths)
    input_image = read_image(input_path, "--input") if input_path is not None else None
    mask = read_image(mask_path, "--mask") if mask_path is not None else None
    control_pictures = [read_image(path, "--control-image") for path in control_images]
    for net in control_nets:
        read_controlnet(net)  # its names and shapes: a file of another kind is refused before the load
    if mask is not None:
        # refuses a mask that cannot work; at the input's own size where none is given (generate checks it again)
        read_mask(mask, input_image.size, settings.width or input_image.width, settings.height or input_image.height)
    random_seed = settings.seed is None
    seed = random.randrange(RANDOM_SEEDS) if random_seed else settings.seed
    if axes:
        batch = plot_settings(replace(settings, prompt=prompts[0], seed=seed), axes, keep_karras="karras" in given(options))
    else:
        batch = batch_settings(settings, prompts, seed, num_images)
    if ray_address is None:  # Ray's workers plan their own
        vae_tiling = plan_memory(batch, checkpoint, device, dtype, vae_tiling)
    planned = plan(batch, output, outdir or Path("outputs"))
    check_writable(planned[0].path.parent, "--output" if output else "--outdir")
    jobs = planned if overwrite else skip_existing(planned, stop=output is not None)
    if not jobs:
        return
    if image is not None:
        warn_of_other_files(from_image, image.settings, checkpoint, embeddings, vae, loras)
    for text in dict.fromkeys(settings.prompt for settings in batch):
        prompt_loras(text, loras)  # a LoRA missing or unreadable is refused before the models load
    inputs = dict(input_image=input_image, mask=mask, vae_tiling=vae_tiling, embeddings=embeddings, control_images=control_pictures,
                  loras=loras)
    if ray_address is None:
        rendered = render(jobs, inputs, checkpoint, vae, device, dtype)
    else:
        rendered = render_batch(jobs, checkpoint, vae=vae, ray_address=ray_address or None, device=device, dtype=dtype, overwrite=True,
                                **ray_options, **inputs)
    if random_seed:
        click.echo(f"seed: {seed}", err=True)
    # a stopped batch is resumed by the same command with the same seed (--outdir skips the images it finds)
    report_saved(rendered, len(jobs), f"; run the same command with --seed {seed} to make the rest" if output is None else "")
    if axes or grid:
        click.echo(f"saved {save_grid(planned, axes)}")


def batch_settings(settings: Settings, prompts: list[str], seed: int, num_images: int) -> list[Settings]:
    """The batch's images: image k of prompt j is number i = j * num_images + k, with seed + i. Refuses a batch of more
    than MAX_BATCH images, or whose seeds would pass MAX_SEED, naming the largest first seed that fits."""
    count = len(prompts) * num_images
    if count > MAX_BATCH:
        raise SDError(f"{count} images ({counted(len(prompts), 'prompt')} x {num_images}) are more than the {MAX_BATCH} one command "
                      "renders: split the batch into several commands")
    if seed + count - 1 > MAX_SEED:
        raise SDError(f"--seed {seed} for {count} images needs seeds up to {seed + count - 1}, beyond the largest "
                      f"({MAX_SEED}): give one of at most {MAX_SEED - count + 1}")
    return [replace(settings, prompt=prompts[index // num_images], seed=seed + index) for index in range(count)]


def warn_of_other_files(from_image: Path, stored: Settings, checkpoint: Path, embeddings, vae: Path | None, loras: LoraLibrary) -> None:
    """Warns where the files --from's image was made with (its checkpoint, embeddings, VAE, LoRAs) differ from these."""
    if stored.model_hash is not None:
        warn_of_another_model(from_image, stored, checkpoint)
    warn_of_other_embeddings(from_image, stored, embeddings)
    warn_of_another_vae(from_image, stored, vae)
    warn_of_other_loras(from_image, stored, loras)


def report_saved(rendered, planned: int, resume: str) -> None:
    """Names each image as it is saved; on Ctrl-C, how many of the `planned` were saved, then `resume`, and exits with
    INTERRUPTED_EXIT_CODE (the images saved are kept)."""
    saved = 0
    try:
        for path in rendered:
            saved += 1
            click.echo(f"saved {path}")
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: {saved} of {planned} images saved{resume}", err=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None


@main.command("info")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON list for scripts: each image's prompts, fields as written, and the settings sd reads from them.")
def info_command(images, as_json):
    """Print the settings stored in images by sd, AUTOMATIC1111 or stable-diffusion.cpp (PNG, JPEG, WebP).

    Exit code 1 when an image has no settings, 2 when one is not an image or holds another tool's metadata.
    """
    results, exit_code = [], 0
    for path in images:
        try:
            results.append(describe(path))
        except SDError as error:
            click.echo(f"error: {error}", err=True)
            results.append({"file": str(path), "error": str(error)})
            exit_code = max(exit_code, error.exit_code)
            continue
        if not as_json:
            click.echo(f"{path}:\n{results[-1]['infotext']}\n" if len(images) > 1 else results[-1]["infotext"])
            if "unusable" in results[-1]:
                click.echo(f"note: sd cannot render these settings: {results[-1]['unusable']}", err=True)
    if as_json:
        click.echo(json.dumps(results, indent=1, ensure_ascii=False))
    raise SystemExit(exit_code)


def describe(path: Path) -> dict:
    """What `sd info --json` says of an image; `settings` is null (with the reason) when sd cannot render them."""
    text = read_infotext_of(path)
    prompt, negative, fields = split_infotext(text)
    result = {"file": str(path), "infotext": text, "prompt": prompt, "negative_prompt": negative, "fields": fields}
    try:
        infotext = read_infotext(text)
        return {**result, "settings": asdict(infotext.settings), "ignored": infotext.ignored}
    except SDError as error:
        return {**result, "settings": None, "unusable": str(error)}


def render(jobs: list[Job], inputs: dict, checkpoint: Path, vae: Path | None, device, dtype: str):
    """Makes and saves each job's image with one model load, yielding each file once it is complete. `inputs`:
    generate()'s input image, mask, VAE tiling, embeddings, LoRA files and control images."""
    models = load(checkpoint, vae, device, dtype)
    controlnets = load_controlnets(jobs[0].settings.controlnets, models, device)
    files, sampling = None, 0.0
    for job in jobs:
        started = time.perf_counter()
        image, = generate(job.settings, models=models, device=device, controlnet_models=controlnets, **inputs)
        sampling += time.perf_counter() - started
        files = files or model_files(checkpoint, vae)  # only now: it reads the whole checkpoint once
        made = replace(image.info["sd"], **files)
        save_png(image, job.path, made.to_infotext())
        yield job.path
    each = f" ({sampling / len(jobs):.1f} s each)" if len(jobs) > 1 else ""
    click.echo(f"sampled {counted(len(jobs), 'image')} in {sampling:.1f} s{each}", err=True)


# every image of a batch is planned before the first renders (its file name, whether it exists): a billion would fill
# the memory first (10,000 take 0.1 s)
MAX_BATCH = 100_000
# the options that are settings, by their names in generate_command -> in Settings where they differ
SETTINGS_NAMES = {"cfg": "cfg_scale"}


def given(options: dict) -> dict:
    """The options among `options` given on the command line."""
    source = click.get_current_context().get_parameter_source
    return {name: value for name, value in options.items() if source(name) == ParameterSource.COMMANDLINE}


def command_settings(base: Settings, options: dict) -> Settings:
    """`base` with the options' values: seed -1 for a random one, and unless --karras or --no-karras is given,
    the chosen sampler's own noise levels (Karras's for dpmpp_2m)."""
    chosen = {SETTINGS_NAMES.get(name, name): value for name, value in options.items()}
    if chosen.get("seed") == -1:
        chosen["seed"] = None
    return replace(base, **own_noise_levels(chosen, keep_karras=False))


def own_noise_levels(chosen: dict, keep_karras: bool) -> dict:
    """`chosen` settings with, where they pick a sampler but not karras (and `keep_karras` is False), that
    sampler's own noise levels: Karras's for dpmpp_2m. A hires sampler always takes its own."""
    if "hires_sampler" in chosen:
        chosen = {**chosen, "hires_karras": karras_by_default(chosen["hires_sampler"])}
    if "sampler" in chosen and chosen.get("karras") is None and not keep_karras:
        return {**chosen, "karras": karras_by_default(chosen["sampler"])}
    return chosen


def read_axis(text: str) -> Axis:
    """An --xy axis, "cfg=3,7.5,12": a setting and its values, separated by commas (csv quoting for a comma)."""
    name, equals, values = text.partition("=")
    name = name.strip().lower().replace("-", "_")
    if name not in AXES:
        raise SDError(f"--xy {text!r}: {name!r} is not a setting an X/Y plot can vary; choose one of {', '.join(AXES)}")
    texts = [value.strip() for value in next(csv.reader([values], skipinitialspace=True), [])] if equals else []
    if not texts or "" in texts:
        raise SDError(f"--xy {text!r}: give {name}'s values after '=', separated by commas, e.g. --xy \"cfg=3,7.5,12\" \"steps=10,20\"")
    try:
        return Axis(name, texts, [AXES[name](value) for value in texts])
    except ValueError:
        raise SDError(f"--xy {text!r}: each value of {name} must be {VALUE_KINDS[AXES[name]]}") from None


def plot_settings(base: Settings, axes: list[Axis], keep_karras: bool) -> list[Settings]:
    """The settings of every cell of an X/Y plot, row by row (Y) and column by column (X). A sampler on an axis
    takes its own noise levels (Karras's for dpmpp_2m) unless --karras or --no-karras is given."""
    x, y = axes
    if x.name == y.name:
        raise SDError(f"--xy: both axes vary {x.name}: give two different settings")
    cells = []
    for y_value in y.values:
        for x_value in x.values:
            chosen = {SETTINGS_NAMES.get(axis.name, axis.name): value for axis, value in ((x, x_value), (y, y_value))}
            try:
                cells.append(replace(base, **own_noise_levels(chosen, keep_karras)))
            except SDError as error:
                raise SDError(f"--xy: {error}") from None
    return cells


def save_grid(jobs: list[Job], axes: list[Axis] | None) -> Path:
    """The batch's images in one grid-NNNN.png beside them (the first number not taken), with the first image's
    settings; an X/Y plot's with each axis' values along its edge."""
    images = [read_image(job.path, "the grid's image") for job in jobs]
    if axes:
        x, y = axes
        rows = [images[row * len(x.values):(row + 1) * len(x.values)] for row in range(len(y.values))]
        sheet = labelled_grid(rows, [f"{x.name}: {text}" for text in x.texts], [f"{y.name}: {text}" for text in y.texts])
    else:
        sheet = contact_sheet(images)
    folder = jobs[0].path.parent
    path = next(folder / name for number in itertools.count() if not (folder / (name := f"grid-{number:04d}.png")).exists())
    save_png(sheet, path, read_infotext_of(jobs[0].path))
    return path


def read_image_settings(path: Path, options: dict, has_input: bool) -> Infotext:
    """The settings of the --from image, but for the fields `options` replace; warns in one line of those sd
    ignores: those it has no setting for, and without --input those of image-to-image."""
    text = read_infotext_of(path)
    try:
        image = read_infotext(text, leave_out=[*(SETTINGS_NAMES.get(name, name) for name in options), "controlnets"])
    except SDError as error:
        raise SDError(f"--from {path}: {error}") from None
    unused = [] if has_input else [name for name, value in (("Denoising strength", image.settings.strength),
                                                               ("Mask blur", image.settings.mask_blur)) if value is not None]
    reasons = []
    if image.ignored:
        reasons.append(f"{', '.join(image.ignored)} (sd has no such settings)")
    if unused:
        reasons.append(f"{', '.join(unused)} (without --input)")
    controlnets = [name for name in image.fields if CONTROLNET_FIELD.match(name)]
    if controlnets:
        reasons.append(f"{', '.join(controlnets)} (give --control-net and --control-image for them)")
    if reasons:
        click.echo(f"warning: ignored from {path}: {'; '.join(reasons)}", err=True)
    return replace(image, settings=replace(image.settings, inpainted=False))


def warn_of_another_model(path: Path, made: Settings, checkpoint: Path) -> None:
    short_hash = hashes.readable_short_hash(checkpoint, "checkpoint")
    if made.model_hash != short_hash:
        model = f" ({made.model})" if made.model else ""
        click.echo(f"warning: {path} was made with model hash {made.model_hash}{model}, not this checkpoint's "
                   f"{short_hash} ({checkpoint.name}): the image will differ", err=True)


def warn_of_other_embeddings(path: Path, made: Settings, embeddings: dict[str, Embedding]) -> None:
    """One line for each embedding the image names (by A1111's name for it) that is missing here or differs."""
    ours = {infotext_name(name): embedding.short_hash for name, embedding in embeddings.items()}
    for name, short_hash in made.ti_hashes.items():
        if name not in ours:
            click.echo(f"warning: {path} was made with the embedding {name} ({short_hash}), which is not among the embeddings: "
                       f"its word is read as text (see --embeddings)", err=True)
        elif ours[name] != short_hash:
            click.echo(f"warning: {path} was made with the embedding {name} {short_hash}, not the {ours[name]} here: the image will differ", err=True)


def warn_of_another_vae(path: Path, made: Settings, vae: Path | None) -> None:
    """One line where the image names a VAE file that differs from this render's. The image cannot say where the
    file is (A1111 writes its name), so --from does not pick it, as it does not pick the checkpoint."""
    if made.vae_hash is None and made.vae is None:
        return
    theirs = f"{made.vae or 'file'} ({made.vae_hash})" if made.vae_hash else made.vae
    if vae is None:
        click.echo(f"warning: {path} was made with the VAE {theirs}, not the checkpoint's own: give that file as --vae, "
                   f"or the image will differ", err=True)
        return
    ours = hashes.readable_short_hash(vae, "VAE file")
    if (made.vae_hash or made.vae) != (ours if made.vae_hash else vae.name):
        click.echo(f"warning: {path} was made with the VAE {theirs}, not {vae.name} ({ours}): the image will differ", err=True)


def warn_of_other_loras(path: Path, made: Settings, loras: LoraLibrary) -> None:
    """One line for each LoRA the image names in its Lora hashes that is missing here or differs."""
    ours = {infotext_name(name): file for name, file in loras.items()}
    for name, short_hash in made.lora_hashes.items():
        if name not in ours:
            click.echo(f"warning: {path} was made with the LoRA {name} ({short_hash}), which is not in {loras.folder}: "
                       f"put it there, or give --lora-dir or --lora FILE", err=True)
        elif (found := read_lora(name, ours[name]).short_hash) != short_hash:
            click.echo(f"warning: {path} was made with the LoRA {name} {short_hash}, not the {found} here: the image will differ", err=True)


def read_lora_options(options: tuple[str, ...]) -> tuple[list[Path], str]:
    """The files of --lora FILE[:MULTIPLIER] and the tags that ask for them, " <lora:NAME:MULTIPLIER>" each."""
    paths, tags = [], ""
    for option in options:
        file, colon, multiplier = option.rpartition(":")
        try:
            path, number = (Path(file), float(multiplier)) if colon else (Path(option), 1.0)
        except ValueError:  # the colon is the path's own, or the multiplier no number
            if Path(file).is_file() and not Path(option).exists():
                raise SDError(f"--lora {option}: the multiplier {multiplier!r} is not a number: give {file}:0.8, say") from None
            path, number = Path(option), 1.0
        paths.append(path)
        tags += f" <lora:{path.stem}:{number:g}>"
    return paths, tags


def read_prompts(prompt: str | None, prompts_file: Path | None, default: str | None = None) -> list[str]:
    """The prompts of --prompt or --prompts-file, else `default` (the --from image's)."""
    if prompt is None and prompts_file is None and default is not None:
        return [default]
    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give either --prompt TEXT or --prompts-file FILE")
    if prompt is not None:
        return [prompt]
    try:
        lines = prompts_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SDError(f"cannot read prompts file {prompts_file} ({error}): give a UTF-8 text file, one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SDError(f"no prompts in {prompts_file}: write one prompt per line (lines starting with # are skipped)")
    return prompts


def plan(batch: list[Settings], output: Path | None, outdir: Path) -> list[Job]:
    """The file of each image of the batch: image i (from 0) as outdir/INDEX-SEED-PROMPT.png, or --output as given
    or numbered from 1."""
    jobs = []
    for index, settings in enumerate(batch):
        if output is None:
            path = outdir / f"{index:05d}-{settings.seed}-{slug(settings.prompt)}.png"
        elif len(batch) == 1:
            path = output
        else:
            path = output.with_name(f"{output.stem}-{index + 1}{output.suffix}")
        jobs.append(Job(settings, path))
    return jobs


def slug(prompt: str) -> str:
    """The prompt as a short file-name part: words joined by "-", e.g. "a-photo-of-a-cat"."""
    words = re.sub(r"[\W_]+", "-", prompt.lower()).strip("-")
    return words[:SLUG_LENGTH].rstrip("-") or "untitled"


def check_writable(folder: Path, option: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SDError(f"cannot create the output folder {folder} ({error.strerror}): choose another {option}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SDError(f"cannot write to the output folder {folder}: choose another {option} or fix its permissions")


def skip_existing(jobs: list[Job], stop: bool) -> list[Job]:
    """The jobs whose file does not exist yet; with `stop`, an existing file is an error instead."""
    remaining = []
    for job in jobs:
        if not job.path.exists():
            remaining.append(job)
        elif stop:
            raise SDError(f"{job.path} exists: pass --overwrite to replace it, or choose another --output")
        else:
            click.echo(f"skipped, exists: {job.path}")
    return remaining


def plan_memory(batch: list[Settings], checkpoint: Path, device, dtype: str, vae_tiling: bool | None) -> bool | None:
    """Refuses, before the load, a batch whose largest image cannot fit in memory; whether the VAE works in tiles
    (sd/memory.py). Images of the model's own size (no size given, no hires fix) are left to generate(), which
    knows it once the model is loaded."""
    side = image_size(checkpoint) if any(settings.hires and not (settings.width and settings.height) for settings in batch) else None

    def final_size(settings: Settings) -> tuple[int, int] | None:
        width, height = settings.width or side, settings.height or side
        if settings.hires:
            target = hires_target(width, height, settings.hires_scale, settings.hires_width, settings.hires_height)
            return target.width, target.height
        return (width, height) if width and height else None

    sizes = [size for size in map(final_size, batch) if size is not None]
    if not sizes:
        return vae_tiling
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    stored = weights_dtype(dtype, device)
    guided = any(settings.cfg_scale != 1.0 for settings in batch)
    controlnets = max(len(settings.controlnets) for settings in batch)
    return plan_vae_tiling(Render(width, height, 1, guided, compute_dtype(stored, device), controlnets), device, stored, vae_tiling)


def load(checkpoint: Path, vae: Path | None, device, dtype: str) -> dict:
    started = time.perf_counter()
    try:
        models = cached_models(checkpoint, device, weights_dtype(dtype, device), vae)
    except SDError as error:
        raise SDError(f"{error}; or {CHECKPOINT_HELP}") from None
    except OSError as error:
        raise SDError(f"cannot read checkpoint {checkpoint} ({error.strerror or error}); {CHECKPOINT_HELP}") from None
    with_vae = f" with the VAE {vae.name}" if vae is not None else ""
    click.echo(f"loaded {checkpoint.name}{with_vae} in {time.perf_counter() - started:.1f} s ({device}, {precision(models, device)})", err=True)
    return models


def load_controlnets(units: tuple[ControlNetUnit, ...], models: dict, device) -> list | None:
    """The ControlNets of the batch (each image's are the same), in the U-Net's dtype; None without any."""
    if not units:
        return None
    started = time.perf_counter()
    controlnets = cached_controlnets([unit.model for unit in units], device, next(models["diffusion"].parameters()).dtype)
    names = ", ".join(Path(unit.model).name for unit in units)
    click.echo(f"loaded {names} in {time.perf_counter() - started:.1f} s", err=True)
    return controlnets


def control_units(nets: tuple[Path, ...], images: tuple[Path, ...], per_unit: dict[str, tuple], canny_low: int, canny_high: int,
                  guess_mode: bool) -> tuple[ControlNetUnit, ...]:
    """The ControlNets asked for, each with its options: a --control-* option given once applies to every
    ControlNet, given once for each to each in order."""
    if len(images) != len(nets):
        raise SDError(f"each --control-net needs a --control-image and each --control-image a --control-net: got {len(nets)} and {len(images)}")
    units = []
    for name, values in per_unit.items():
        if len(values) not in (0, 1, len(nets)) or (values and not nets):
            raise SDError(f"--control-{name} given {len(values)} times for {len(nets)} --control-net: give it once for all, or once for each")
    for index, net in enumerate(nets):
        chosen = {name: values[index if len(values) > 1 else 0] for name, values in per_unit.items() if values}
        units.append(ControlNetUnit(str(net), **chosen, guess_mode=guess_mode, canny_low=canny_low, canny_high=canny_high))
    return tuple(units)


def precision(models: dict, device) -> str:
    """"fp32", or "bf16 weights, fp32 compute" where the two differ (see sd/precision.py)."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    stored = next(models["diffusion"].parameters()).dtype
    compute = compute_dtype(stored, device)
    return names[stored] if compute == stored else f"{names[stored]} weights, {names[compute]} compute"


def model_files(checkpoint: Path, vae: Path | None) -> dict:
    """The settings that name the checkpoint and the VAE file (sd/files/hashes.py, file_fields), saying so where
    a file is read whole to hash it."""
    for path in (checkpoint, vae):
        if path is not None and hashes.cached_sha256(path) is None:
            click.echo(f"hashing {path.name} for the image metadata (once: the hash is cached)", err=True)
    return hashes.file_fields(checkpoint, vae)


if __name__ == "__main__":
    main()
