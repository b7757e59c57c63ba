"""Write a seeded random-weight SD1.5, SDXL or SD2.1-unclip-h checkpoint with the original LDM key names.

Runs with Forge's python, from Forge's folder (it builds the models from Forge's own classes and the configs Forge
ships under backend/huggingface/), so Forge's loader claims every key. Usage:

    python make_checkpoint.py --arch sd15|sdxl|sd21unclip_h --out FILE.safetensors [--seed 0]

sd21unclip_h is SD2.1's UNet with the unCLIP ADM input (label_emb from 2048: a 1024-d ViT-H/14 image embedding and
its 1024-d noise-level embedding), SD2.1's OpenCLIP-H text encoder and VAE, and the noise augmentor's tensors
(`noise_augmentor.data_mean` / `data_std` and the squaredcos_cap_v2 schedule). The checkpoint's own OpenCLIP vision
embedder (`embedder.model.visual.*`) is left out: the extension reads the ViT-H/14 encoder from the models folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import struct
import sys

_here = os.getcwd()
_NEO = os.path.isdir(os.path.join(_here, "modules_forge", "packages"))  # Forge Neo vendors its packages there
# backend.args reads sys.argv; no CUDA probe on CPU-only machines (Neo's flag is --cpu, Forge 2.0's --always-cpu)
sys.argv += ["--cpu" if _NEO else "--always-cpu"]
sys.path[:0] = [
    _here,
    os.path.join(_here, "modules_forge", "packages") if _NEO else os.path.join(_here, "packages_3rdparty"),
    os.path.join(_here, "repositories", "huggingface_guess"),
]

import torch  # noqa: E402

REPOS = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd21unclip_h": "stabilityai/stable-diffusion-2-1",
}


def _norm_names(state: dict) -> set[str]:
    """The affine parameters of norm layers: a 1-D `weight` and the `bias` beside it."""
    out = set()
    for name, t in state.items():
        if name.endswith(".weight") and t.ndim == 1:
            out |= {name, name[: -len("weight")] + "bias"}
    return out


def init_tensor(name: str, like: torch.Tensor, norm: bool, gen: torch.Generator) -> torch.Tensor:
    """One parameter, drawn in fp32 then stored in fp16: Linear/Conv ~ N(0, 1/fan_in), biases 0, embeddings N(0, 0.02),
    norms 1 + N(0, 0.1) and N(0, 0.1).

    Norms are not left at 1/0: a LayerNorm with weight 1 and bias 0 gives every token a mean of exactly zero (up to
    rounding), and the WebUIs' "Original" emphasis divides by the conditioning's mean (Neo's default, at Clip skip 2,
    reads the final LayerNorm's output), so some prompts gave 0/0 = NaN conditionings and black images. A trained
    checkpoint's norms are never at their initial values either."""
    t = torch.empty(like.shape, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if norm:
        t.normal_(1.0 if leaf == "weight" else 0.0, 0.1, generator=gen)
    elif leaf == "bias":
        t.zero_()
    elif "embed" in name and t.ndim == 2 and "proj" not in name:
        t.normal_(0.0, 0.02, generator=gen)
    else:
        fan_in = t[0].numel() if t.ndim > 1 else t.numel()
        t.normal_(0.0, fan_in**-0.5, generator=gen)
    return t.to(torch.float16)


def materialise(module: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The state of `module` (built on the meta device) drawn one tensor at a time, floating tensors in fp16: the
    peak is one fp32 tensor, not the model in fp32."""
    state = module.state_dict(keep_vars=True)
    buffers = {name for name, _ in module.named_buffers()}
    norms = _norm_names(state)
    out = {}
    for name, t in state.items():
        if name in buffers or not t.is_floating_point():
            if name.endswith("position_ids"):
                out[name] = torch.arange(t.shape[-1]).expand(t.shape).to(t.dtype).contiguous()
            else:
                out[name] = torch.zeros(t.shape, dtype=torch.float16 if t.is_floating_point() else t.dtype)
        else:
            out[name] = init_tensor(name, t, name in norms, gen)
    return out


def unet_state(arch: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    import huggingface_guess
    from backend.nn.unet import IntegratedUNet2DConditionModel

    common = dict(in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True, num_head_channels=-1)
    if arch == "sd21unclip_h":
        cfg = dict(
            common,
            num_res_blocks=[2, 2, 2, 2],
            channel_mult=[1, 2, 4, 4],
            num_heads=-1,
            num_head_channels=64,
            context_dim=1024,
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            transformer_depth_middle=1,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            use_linear_in_transformer=True,
            adm_in_channels=2048,
            num_classes="sequential",
        )
    elif arch == "sd15":
        cfg = dict(
            common,
            num_res_blocks=[2, 2, 2, 2],
            channel_mult=[1, 2, 4, 4],
            num_heads=8,
            context_dim=768,
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            transformer_depth_middle=1,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            use_linear_in_transformer=False,
        )
    else:
        cfg = dict(
            common,
            num_res_blocks=[2, 2, 2],
            channel_mult=[1, 2, 4],
            num_heads=-1,
            num_head_channels=64,
            context_dim=2048,
            transformer_depth=[0, 0, 2, 2, 10, 10],
            transformer_depth_middle=10,
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
            use_linear_in_transformer=True,
            adm_in_channels=2816,
            num_classes="sequential",
        )
    # transformer_depth_output is consumed from its end: output block 0 takes the last entry
    with torch.device("meta"):
        model = IntegratedUNet2DConditionModel(**cfg)
    with_attn = sorted(
        {int(k.split(".")[1]) for k in model.state_dict() if k.startswith("output_blocks.") and ".attn1." in k}
    )
    expected = {"sd15": list(range(3, 12)), "sdxl": list(range(0, 6)), "sd21unclip_h": list(range(3, 12))}[arch]
    if with_attn != expected:
        raise SystemExit(f"output blocks with self-attention {with_attn}, expected {expected}")
    sd = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    guessed = huggingface_guess.guess(sd)
    want = {"sd15": "SD15", "sdxl": "SDXL", "sd21unclip_h": "SD21UnclipH"}[arch]
    if type(guessed).__name__ != want:
        raise SystemExit(f"model detection saw {type(guessed).__name__}, expected {want}")
    del sd
    return {"model.diffusion_model." + k: v for k, v in materialise(model, gen).items()}


def vae_state(arch: str, gen: torch.Generator, root: str) -> dict[str, torch.Tensor]:
    from backend.nn.vae import IntegratedAutoencoderKL

    config = IntegratedAutoencoderKL.load_config(os.path.join(root, REPOS[arch], "vae"))
    with torch.device("meta"):
        model = IntegratedAutoencoderKL.from_config(config)
    return {"first_stage_model." + k: v for k, v in materialise(model, gen).items()}


def clip_state(arch: str, gen: torch.Generator, root: str) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def build(sub: str, cls):
        cfg = CLIPTextConfig.from_pretrained(os.path.join(root, REPOS[arch], sub))
        with torch.device("meta"):
            model = cls(cfg)
        return materialise(model, gen)

    position_ids = torch.arange(77).unsqueeze(0)
    if arch == "sd15":
        sd = {"cond_stage_model.transformer." + k: v for k, v in build("text_encoder", CLIPTextModel).items()}
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = position_ids
        return sd
    if arch == "sd21unclip_h":
        from huggingface_guess.model_list import SD20

        sd = {"clip_h.transformer." + k: v for k, v in build("text_encoder", CLIPTextModel).items()}
        return SD20.process_clip_state_dict_for_saving(SD20.__new__(SD20), sd)
    from huggingface_guess.model_list import SDXL

    sd = {"clip_l.transformer." + k: v for k, v in build("text_encoder", CLIPTextModel).items()}
    sd.update({"clip_g.transformer." + k: v for k, v in build("text_encoder_2", CLIPTextModelWithProjection).items()})
    return SDXL.process_clip_state_dict_for_saving(SDXL.__new__(SDXL), sd)


def noise_augmentor_state(gen: torch.Generator, dim: int = 1024) -> dict[str, torch.Tensor]:
    """The unCLIP noise augmentor's buffers: data statistics (random, std > 0) and the squaredcos_cap_v2 schedule."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - alpha_bar((i + 1) / 1000) / alpha_bar(i / 1000), 0.999) for i in range(1000)])
    return {
        "noise_augmentor.data_mean": torch.randn(1, dim, generator=gen) * 0.1,
        "noise_augmentor.data_std": 0.5 + torch.rand(1, dim, generator=gen),
        "noise_augmentor.betas": betas,
        "noise_augmentor.alphas_cumprod": torch.cumprod(1.0 - betas, dim=0),
    }


class StreamingWriter:
    """Writes a safetensors file one part at a time: each part's tensors go to a data file as they come and are
    dropped, then the header (sorted, byte-reproducible) and the data are joined into `path`. Peak memory is one
    part, not the checkpoint."""

    def __init__(self, path: str):
        self.path, self.entries, self.offset = path, {}, 0
        self.data = open(path + ".data", "wb")  # noqa: SIM115 - closed in finish()

    def add(self, state: dict[str, torch.Tensor]) -> None:
        dtypes = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
        for name in sorted(state):
            t = state[name].contiguous()
            raw = t.view(torch.uint8).numpy() if t.numel() else b""
            size = t.numel() * t.element_size()
            self.data.write(memoryview(raw))
            self.entries[name] = {
                "dtype": dtypes[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [self.offset, self.offset + size],
            }
            self.offset += size

    def finish(self, metadata: dict[str, str]) -> None:
        self.data.close()
        header = json.dumps({"__metadata__": metadata, **self.entries}, sort_keys=True, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        with open(self.path + ".part", "wb") as out, open(self.path + ".data", "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(data, out, 64 << 20)
        os.remove(self.path + ".data")
        os.replace(self.path + ".part", self.path)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=sorted(REPOS), default="sd15")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args, _ = ap.parse_known_args()

    root = os.path.join(os.getcwd(), "backend", "huggingface")
    gen = torch.Generator().manual_seed(args.seed)
    parts = [
        lambda: unet_state(args.arch, gen),
        lambda: vae_state(args.arch, gen, root),
        lambda: clip_state(args.arch, gen, root),
    ]
    if args.arch == "sd21unclip_h":
        parts.append(lambda: noise_augmentor_state(gen))  # fp32, as in the released checkpoints
    writer = StreamingWriter(args.out)
    for make in parts:  # one component in memory at a time, in fp16
        writer.add(make())
    writer.finish({"generator": "sd-webui-imgcond tests/e2e/make_checkpoint.py", "arch": args.arch})
    count = sum(math.prod(e["shape"]) for e in writer.entries.values())
    print(f"wrote {args.out}: {count:,} parameters, peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
