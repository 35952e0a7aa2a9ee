"""Parameter shapes of real models, computed in code (no downloads). Tensor counts and sizes match the
published models: ResNet-50 161 tensors / 25.6M, BERT-base 199 / 110M, GPT-2 small 148 / 124M,
ViT-B/16 152 / 86.6M, Llama-3.2-1B 146 / 1.24B (tied embeddings)."""

from __future__ import annotations


def resnet50() -> list[tuple[int, ...]]:
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, cin, 1, 1), (4 * width,), (4 * width,)]
            cin = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def _encoder_layer(d: int, ff: int) -> list[tuple[int, ...]]:
    return [(d, d), (d,), (d, d), (d,), (d, d), (d,), (d, d), (d,), (d,), (d,), (ff, d), (ff,), (d, ff), (d,),
            (d,), (d,)]


def bert_base() -> list[tuple[int, ...]]:
    shapes = [(30522, 768), (512, 768), (2, 768), (768,), (768,)]
    for _ in range(12):
        shapes += _encoder_layer(768, 3072)
    return shapes + [(768, 768), (768,)]


def gpt2_small() -> list[tuple[int, ...]]:
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,), (768, 3072), (3072,),
                   (3072, 768), (768,)]
    return shapes + [(768,), (768,)]


def vit_b16() -> list[tuple[int, ...]]:
    shapes = [(768, 3, 16, 16), (768,), (1, 1, 768), (1, 197, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (3072, 768), (3072,),
                   (768, 3072), (768,)]
    return shapes + [(768,), (768,), (1000, 768), (1000,)]


def llama_3_2_1b() -> list[tuple[int, ...]]:
    shapes = [(128256, 2048)]
    for _ in range(16):
        shapes += [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192),
                   (2048,), (2048,)]
    return shapes + [(2048,)]


MODELS = {"resnet50": resnet50, "bert-base": bert_base, "gpt2-small": gpt2_small, "vit-b16": vit_b16,
          "llama-3.2-1b": llama_3_2_1b}


def numel(shapes) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total
