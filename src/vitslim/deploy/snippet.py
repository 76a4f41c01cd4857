"""The "How to use this model" snippet of the report: load the artifact, feed one image as
its contract says, print what comes out.

For an ONNX artifact the snippet needs only its runtime (onnxruntime or openvino), Pillow and numpy, and re-implements
timm's evaluation transform (shorter side resized as torchvision does, the same PIL filter,
centre crop rounded as torchvision rounds, float32 scaling and normalization): a test holds
it equal to vitslim's own loader on real images. A saved folder needs vitslim to load.
"""

from __future__ import annotations

from pathlib import Path

from vitslim.artifact.contract import Contract, describe_preprocessing
from vitslim.output import markdown_code, markdown_text, vitslim_command

PIL_FILTERS = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST", "lanczos": "LANCZOS"}


def snippet_supported(contract: Contract) -> bool:
    """The numpy re-implementation covers timm's default centre crop of a square input (PIL)."""
    p = contract.preprocessing
    return (p["crop_mode"] == "center" and p["input_size"][1] == p["input_size"][2]
            and p["interpolation"] in PIL_FILTERS and p.get("resampler", "pil") == "pil")


def _print_lines(contract: Contract) -> str:
    if contract.num_classes:
        which = "ImageNet-1k class index" if contract.num_classes == 1000 else "class index"
        return ("probs = np.exp(output - output.max())\n"
                "probs /= probs.sum()\n"
                "for c in np.argsort(-probs)[:5]:\n"
                f"    print(int(c), round(float(probs[c]), 4))  # {which}, probability\n")
    return (f"print(output.shape, output[:4])  # the {contract.output.get('dim')}-d feature vector "
            "(compare with cosine similarity)\n")


def _runtime_of(contract: Contract) -> str:
    """``openvino`` when the artifact's export step names it, else ``onnxruntime``."""
    steps = contract.recipe.get("steps") or []
    return next((s["export"].get("runtime", "onnxruntime") for s in steps if "export" in s), "onnxruntime")


def _run_lines(contract: Contract) -> tuple[str, str]:
    """The import and the lines that run the file on ``preprocess(IMAGE)``, in the artifact's runtime."""
    if _runtime_of(contract) == "openvino":
        step = next(s["export"] for s in contract.recipe["steps"] if "export" in s)
        crop = contract.preprocessing["input_size"][1]
        return "import openvino as ov", (
            "core = ov.Core()\n"
            "model = core.read_model(MODEL)\n"
            f"model.reshape([1, 3, {crop}, {crop}])  # one image at a time: fixed shapes run faster\n"
            f'compiled = core.compile_model(model, "CPU", {{"INFERENCE_PRECISION_HINT": "{step["precision"]}"}})\n'
            "output = compiled(preprocess(IMAGE))[0][0]\n")
    return "import onnxruntime as ort", ('session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])\n'
                                        'output = session.run(None, {"images": preprocess(IMAGE)})[0][0]\n')


def onnx_snippet(model_path: str | Path, image: str | Path, contract: Contract) -> str:
    """Load the ONNX artifact in its runtime (ONNX Runtime, or OpenVINO at the recorded
    precision hint), preprocess one image with numpy and Pillow, print the output."""
    p = contract.preprocessing
    runtime_import, run = _run_lines(contract)
    crop, resize = p["input_size"][1], p["resize"][0]
    as_list = lambda values: "[" + ", ".join(repr(float(v)) for v in values) + "]"  # noqa: E731
    return f'''import numpy as np
{runtime_import}
from PIL import Image

MODEL = {Path(model_path).name!r}  # the artifact, beside this report
IMAGE = {Path(image).name!r}  # an image of yours
MEAN = np.array({as_list(p["mean"])}, dtype=np.float32)
STD = np.array({as_list(p["std"])}, dtype=np.float32)


def preprocess(path):
    """Shorter side to {resize} px ({p["interpolation"]}), centre crop {crop}x{crop}, scale to [0, 1], mean/std."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    size = ({resize}, int({resize} * h / w)) if w <= h else (int({resize} * w / h), {resize})
    image = image.resize(size, Image.{PIL_FILTERS[p["interpolation"]]})
    left, top = int(round((size[0] - {crop}) / 2)), int(round((size[1] - {crop}) / 2))
    image = image.crop((left, top, left + {crop}, top + {crop}))
    x = (np.asarray(image, dtype=np.float32) / 255 - MEAN) / STD
    return x.transpose(2, 0, 1)[None]  # (1, 3, {crop}, {crop}) float32


''' + run + _print_lines(contract)


def folder_snippet(model_path: str | Path, image: str | Path, contract: Contract) -> str:
    return f'''from PIL import Image
import numpy as np
import vitslim

MODEL = {Path(model_path).name!r}  # the artifact, beside this report
IMAGE = {Path(image).name!r}  # an image of yours

artifact = vitslim.load(MODEL)  # the PyTorch model, rebuilt from the saved folder
x = artifact.contract.transform()(Image.open(IMAGE).convert("RGB"))[None]
output = artifact(x)[0].numpy()
''' + _print_lines(contract)


def usage_markdown(model_path: str | Path, image: str | Path, contract: Contract, data: str | Path) -> str:
    """The report's "How to use this model" section, in Markdown."""
    path = Path(model_path)
    onnx = path.suffix == ".onnx"
    out = contract.output
    names = out.get("class_names")
    names = f"{names[0]!r}, {names[1]!r}, ... (output.class_names)" if isinstance(names, list) else names
    meaning = (f"{out['classes']} class logits ({names})" if contract.num_classes
               else f"a {out.get('dim')}-d feature vector per image")
    command = vitslim_command("predict", path.name, "--data", Path(data).name)
    lines = ["## How to use this model", "",
             f"The artifact: {markdown_code(path.name)} "
             f"({_runtime_name(contract) if onnx else 'PyTorch model folder'}). "
             f"Input: {markdown_text(describe_preprocessing(contract.preprocessing))}. "
             f"Output: {markdown_text(meaning)}. "
             "All of this, the recipe and the measured fidelity are stored in the file "
             f"({'its metadata_props' if onnx else 'vitslim.json'}).", "",
             "Check it on your images (the same preprocessing; prints the top-5 classes or writes the features):", "",
             "```bash", command, "```", ""]
    if onnx and snippet_supported(contract):
        lines += [f"In your service ({_runtime_of(contract)}, Pillow and numpy only; vitslim not needed):", "",
                  "```python", onnx_snippet(path, _example(data), contract).rstrip(), "```"]
    elif onnx:
        lines += [f"(No numpy snippet for crop mode {markdown_text(repr(contract.preprocessing['crop_mode']))}: "
                  "feed images as `vitslim predict` does.)"]
    else:
        lines += ["In Python (this artifact is a PyTorch model, so it needs vitslim):", "",
                  "```python", folder_snippet(path, _example(data), contract).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _runtime_name(contract: Contract) -> str:
    if _runtime_of(contract) == "openvino":
        step = next(s["export"] for s in contract.recipe["steps"] if "export" in s)
        return f"OpenVINO, precision hint {step['precision']}"
    return "ONNX Runtime"


def _example(data: str | Path) -> Path:
    from vitslim.data import list_images

    return list_images(data)[0][0]
