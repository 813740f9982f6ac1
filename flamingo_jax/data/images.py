"""Image decoding and preprocessing (numpy + Pillow), for the model's NHWC float input.

`decode(bytes) -> uint8 [H, W, 3]` (raises ImageDecodeError on anything undecodable).
`preprocess(image, mode=..., size=..., train=..., rng=...) -> float32 [size, size, 3]`:

  'paper': the Flamingo recipe: resize (bicubic, antialiased) so the LONG side is `size`
           (paper: 320), aspect kept, centred on a square of the mean colour. Normalised
           with the ImageNet mean / std, so the padding is exactly 0.
  'clip':  OpenFlamingo's open_clip transform: bicubic resize of the SHORT side to `size`
           (224), centre crop, CLIP mean / std.

Training (`train=True`, `rng` required) adds a random horizontal flip (p = 1/2) and mild
colour augmentation (brightness, contrast, saturation factors each uniform in
[1 - 0.2, 1 + 0.2], applied in that order, clipped to [0, 1]) to the image content,
before padding, so padding stays 0. Evaluation is deterministic and ignores `rng`.
Grayscale [H, W] / [H, W, 1] is replicated to RGB; RGBA is composited onto white.
"""
import io

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
MODES = ("paper", "clip")
COLOUR_JITTER = 0.2


class ImageDecodeError(ValueError):
  """Bytes that are not a decodable image."""


def decode(image_bytes: bytes) -> np.ndarray:
  """Encoded image (JPEG, PNG, WebP, GIF's first frame, ...) → uint8 [H, W, 3] RGB.

  EXIF orientation is applied; transparency is composited onto white.
  """
  try:
    with Image.open(io.BytesIO(image_bytes)) as img:
      img.load()
      img = ImageOps.exif_transpose(img)
      if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
      img = img.convert("RGB")
      array = np.asarray(img, np.uint8)
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb…)
    size = len(image_bytes) if isinstance(image_bytes, (bytes, bytearray)) else "?"
    raise ImageDecodeError(f"undecodable image ({size} bytes): {type(e).__name__}: {e}") from e
  if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) == 0:
    raise ImageDecodeError(f"decoded to an unusable shape {array.shape}")
  return array


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] → uint8 [H, W, 3]."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image: expected uint8 pixels, got dtype {image.dtype}")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) == 0:
    raise ValueError(f"image: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] with H, W "
                     f"> 0, got shape {image.shape}")
  if image.shape[2] == 1:
    return np.repeat(image, 3, axis=2)
  if image.shape[2] == 4:
    alpha = image[:, :, 3:].astype(np.float32) / 255.0
    rgb = image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
  return image


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC), np.uint8)


def _colour_augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """x: float32 [h, w, 3] in [0, 1]."""
  b, c, s = rng.uniform(1 - COLOUR_JITTER, 1 + COLOUR_JITTER, size=3)
  x = x * b
  grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
  x = (x - grey.mean()) * c + grey.mean()
  grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None]
  x = (x - grey) * s + grey
  return np.clip(x, 0.0, 1.0).astype(np.float32)


def preprocess(image: np.ndarray, *, mode: str = "paper", size: int = 320, train: bool = False,
               rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 image → normalised float32 [size, size, 3]; see the module docstring."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; one of {MODES}")
  if size <= 0:
    raise ValueError(f"size={size} must be positive")
  if train and rng is None:
    raise ValueError("train=True needs an rng (np.random.Generator) for the augmentation")
  image = to_rgb(image)
  h, w = image.shape[:2]

  if mode == "paper":
    scale = size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  else:  # torchvision Resize(size) on the short side, then CenterCrop(size)
    if h <= w:
      nh, nw = size, max(size, int(size * w / h))
    else:
      nh, nw = max(size, int(size * h / w)), size
    mean, std = CLIP_MEAN, CLIP_STD
  content = _resize(image, nh, nw)
  if mode == "clip":
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    content = content[top:top + size, left:left + size]

  x = content.astype(np.float32) / 255.0
  if train:
    if rng.random() < 0.5:
      x = x[:, ::-1]
    x = _colour_augment(x, rng)
  x = (x - mean) / std
  if mode == "paper":  # centre on a square of the mean colour (0 after normalisation)
    out = np.zeros((size, size, 3), np.float32)
    top, left = (size - x.shape[0]) // 2, (size - x.shape[1]) // 2
    out[top:top + x.shape[0], left:left + x.shape[1]] = x
    return out
  return np.ascontiguousarray(x, dtype=np.float32)
