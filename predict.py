"""Device-side prediction with an exported model: TorchScript (``.pt``) or ONNX (``.onnx``, run by onnxruntime).

It needs torch, numpy, onnxruntime for ``.onnx`` files and Pillow for image files; never the rest of fedsqueeze.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_images", "load_labels", "main", "predict"]

_BATCH = 128
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _npz_array(path: Path, key: str | None, preferred: Sequence[str]) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        names = list(npz.files)
        if key is not None:
            if key not in names:
                raise ValueError(f"{path}: no array {key!r}; arrays are {names}")
            return npz[key]
        for name in preferred:
            if name in names:
                return npz[name]
        if len(names) == 1:
            return npz[names[0]]
        raise ValueError(f"{path}: holds several arrays {names}; name one with --key (or --labels-key)")


def load_images(paths: Sequence[str | os.PathLike[str]], key: str | None = None) -> np.ndarray:
    """Read images from one .npy/.npz file or from image files (PNG, JPEG, BMP).

    Parameters
    ----------
    paths : sequence of path
        Either a single .npy/.npz file with an array ``(N, H, W)`` or ``(N, H, W, C)``, or
        one or more image files (all the same size).
    key : str or None
        Array name inside an .npz; None takes ``x_test`` or the only array (default: None).

    Returns
    -------
    numpy.ndarray
        Pixel values, ``(N, H, W)`` or ``(N, H, W, C)``.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("no image files given")
    suffixes = {p.suffix.lower() for p in files}
    if suffixes & {".npy", ".npz"}:
        if len(files) != 1:
            raise ValueError("give exactly one .npy/.npz file, or image files only")
        path = files[0]
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        return _npz_array(path, key, ("x_test", "x", "images"))
    unknown = [str(p) for p in files if p.suffix.lower() not in _IMAGE_SUFFIXES]
    if unknown:
        raise ValueError(f"unsupported image files {unknown}; expected .npy, .npz or {', '.join(_IMAGE_SUFFIXES)}")
    from PIL import Image  # Pillow comes with torchvision; only needed for image files

    arrays = []
    for path in files:
        with Image.open(path) as img:
            grey = img.mode in ("1", "L", "LA", "I", "I;16")
            arrays.append(np.asarray(img.convert("L" if grey else "RGB")))
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images differ in size: {sorted({a.shape for a in arrays})}")
    return np.stack(arrays)


def load_labels(spec: str, images_path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Read labels from a .npy/.npz file, or from array ``spec`` of the images' .npz file.

    Parameters
    ----------
    spec : str
        A .npy/.npz path (an .npz must hold ``y_test`` or a single array), or the name of an
        array inside the images' .npz file (e.g. ``y_test``).
    images_path : path or None
        The .npz the images came from, used when ``spec`` is an array name (default: None).

    Returns
    -------
    numpy.ndarray
        Integer labels ``(N,)``.
    """
    path = Path(spec)
    if path.suffix.lower() == ".npy" and path.is_file():
        labels = np.load(path, allow_pickle=False)
    elif path.suffix.lower() == ".npz" and path.is_file():
        labels = _npz_array(path, None, ("y_test", "y", "labels"))
    elif images_path is not None and Path(images_path).suffix.lower() == ".npz":
        labels = _npz_array(Path(images_path), spec, ())
    else:
        raise ValueError(f"labels {spec!r}: expected a .npy/.npz file or an array name in the images' .npz file")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    return labels


def _to_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) pixel values 0..255 -> float32 (N, C, H, W)."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim == 3:
        x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        x = torch.from_numpy(np.ascontiguousarray(images[..., :3] if images.shape[-1] == 4 else images)).permute(
            0, 3, 1, 2
        )
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C) with C in 1, 3, 4, got shape {images.shape}")
    if images.dtype == np.uint8:
        return x.to(torch.float32)
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise ValueError(f"images must hold numbers, got dtype {images.dtype}")
    x = x.to(torch.float32)
    if len(x) and float(x.max()) <= 1.0 and np.issubdtype(images.dtype, np.floating):
        x = x * 255.0  # float images in [0, 1]
    return x


def _load_model(model_path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but works
        return torch.jit.load(str(model_path), map_location="cpu")


def _onnx_predict(model_path: str | os.PathLike[str], x: torch.Tensor) -> np.ndarray:
    """Classes predicted by an ONNX file in onnxruntime (CPU), batch by batch."""
    try:
        import onnxruntime
    except ImportError as err:
        raise RuntimeError(
            f"{model_path}: reading .onnx files needs onnxruntime (pip install 'fedsqueeze[onnx]'); "
            "or use the TorchScript (.pt) file"
        ) from err
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batches = [session.run(None, {name: x[i : i + _BATCH].numpy()})[0].argmax(1) for i in range(0, len(x), _BATCH)]
    return np.concatenate(batches).astype(np.int64) if batches else np.zeros(0, dtype=np.int64)


@torch.inference_mode()
def predict(model_path: str | os.PathLike[str], images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Predict the class of each image with an exported TorchScript or ONNX model.

    The model (written by ``fedsqueeze.server.export.export_compact`` or
    ``fedsqueeze.server.onnx_export.export_onnx``) takes raw pixel values and applies the
    training normalisation itself. A file whose name ends in ``.onnx`` runs in onnxruntime,
    any other in TorchScript.

    Parameters
    ----------
    model_path : path
        TorchScript (``.pt``) or ONNX (``.onnx``) file.
    images : numpy.ndarray or torch.Tensor
        Pixel values 0..255 (uint8, or float; floats all <= 1 are taken as [0, 1]),
        shape ``(N, H, W)``, ``(N, H, W, C)`` or a single ``(H, W)`` image.

    Returns
    -------
    numpy.ndarray
        int64 predicted classes ``(N,)``.

    Raises
    ------
    RuntimeError
        If the file is ``.onnx`` and onnxruntime is not installed.
    """
    if isinstance(images, torch.Tensor):
        images = images.numpy()
    x = _to_nchw(images)
    if Path(model_path).suffix.lower() == ".onnx":
        return _onnx_predict(model_path, x)
    model = _load_model(model_path)
    model.eval()
    outputs = [model(x[i : i + _BATCH]).argmax(1) for i in range(0, len(x), _BATCH)]
    return torch.cat(outputs).numpy().astype(np.int64) if outputs else np.zeros(0, dtype=np.int64)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedsqueeze predict MODEL IMAGES...``: print one predicted class per image.

    Returns 0 on success, 2 on bad input (the error goes to stderr). With ``--labels`` the
    accuracy is printed to stderr after the predictions.
    """
    parser = argparse.ArgumentParser(
        prog="fedsqueeze predict",
        description="Classify images with an exported fedsqueeze model (TorchScript .pt or ONNX .onnx).",
    )
    parser.add_argument("model", help="exported TorchScript (.pt) or ONNX (.onnx, needs onnxruntime) file")
    parser.add_argument("images", nargs="+", help="one .npy/.npz file (N x H x W [x C], 0..255) or image files")
    parser.add_argument("--key", default=None, help="array name in an images .npz (default: x_test or the only array)")
    parser.add_argument(
        "--labels", default=None, help="labels .npy/.npz file, or an array name in the images .npz (e.g. y_test)"
    )
    args = parser.parse_args(argv)
    try:
        images = load_images(args.images, args.key)
        labels = load_labels(args.labels, args.images[0]) if args.labels else None
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if not Path(args.model).is_file():
            raise ValueError(f"model file {args.model} does not exist")
        predictions = predict(args.model, images)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"fedsqueeze predict: error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(f"{int(p)}\n" for p in predictions))
    if labels is not None:
        correct = int((predictions == labels).sum())
        print(f"accuracy: {correct / max(1, len(labels)):.4f} ({correct}/{len(labels)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
