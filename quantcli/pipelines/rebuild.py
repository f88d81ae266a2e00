"""`verify FILE --rebuild-from SOURCE`: is FILE what its recorded recipe makes from SOURCE, byte for byte?

`quantize` records in every output what remakes it (`quantcli.recipe`: the flags, the imatrix and
profile by sha256; `quantize.recipe_of`), the source's sha256 and the date. The rebuild checks each
input against what was recorded before it runs — the source, the imatrix (`--imatrix`, else the path
the file recorded), the profile (`--profile`, else a file of the recorded name beside FILE) — and
names the first that is missing or differs. Then it quantizes SOURCE again with the recorded date
into a scratch folder beside FILE and compares the two files: identical, or the first tensor or
metadata key that differs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from quantcli.errors import QuantcliError
from quantcli.formats import ModelReader, open_model
from quantcli.pipelines.common import open_source, source_sha256


def rebuild(file: Path, reader: ModelReader, source: Path, imatrix: Path | None = None,
            profile: Path | None = None) -> tuple[bool, str, dict[str, Any]]:
    """(identical, what was found, details) for FILE (open as `reader`) remade from SOURCE."""
    from quantcli.pipelines import quantize

    file = Path(file)
    raw = reader.meta("quantcli.recipe")
    if raw is None:
        return False, f"{file.name} records no recipe (not written by a quantcli quantize that records one)", {}
    recipe = json.loads(str(raw))
    info: dict[str, Any] = {"recipe": recipe, "source": str(source)}
    if recipe.get("automatic"):
        return False, ("an automatic mix whose profile was not saved: only the analysis remakes it (quantize "
                       "--save-profile records a mix that --rebuild-from can remake)"), info
    if recipe.get("transform"):
        return False, "a transformed model (smooth): rebuild it with the command that made it", info
    if recipe.get("lora"):
        shas = ", ".join(a["sha256"][:12] for a in recipe["lora"])
        return False, (f"LoRA adapters were merged (sha256 {shas}): rebuild it with the command that made it, "
                       "--lora included"), info
    want = reader.meta("quantcli.source.sha256")
    try:
        with open_source(Path(source), lambda _m: None) as src:
            have = source_sha256(src)
    except QuantcliError as exc:
        return False, f"the source cannot be read: {exc.message}", info
    if have != want:
        return False, (f"the source differs: {Path(source).name} has sha256 {have[:16]}..., {file.name} was made "
                       f"from {reader.meta('quantcli.source.file')} with sha256 {str(want)[:16]}..."), info
    opts_imatrix = None
    if recipe.get("imatrix_statistics_sha256"):
        from quantcli.calibrate import imatrix_file

        recorded = reader.meta("quantize.imatrix.file")
        path = Path(imatrix) if imatrix is not None else (Path(str(recorded)) if recorded else None)
        if imatrix is None and path is not None and not path.is_absolute() and not path.is_file():
            path = file.parent / path  # recorded relative to where quantize ran: try beside FILE
        if path is None or not path.is_file():
            return False, (f"needs the imatrix it was made with (recorded as {recorded}): pass --imatrix FILE"), info
        try:
            got = imatrix_file.load(path).filtered(list(recipe["include_weights"]),
                                                   list(recipe["exclude_weights"])).digest()
        except QuantcliError as exc:
            return False, f"the imatrix cannot be read: {exc.message}", info
        want = recipe["imatrix_statistics_sha256"]
        if got != want:
            return False, (f"the imatrix differs: the statistics of {path} have sha256 {got[:16]}..., {file.name} "
                           f"was made with {want[:16]}..."), info
        opts_imatrix = path
    opts_profile = None
    if recipe.get("profile_sha256"):
        name = reader.meta("quantcli.profile")
        path = Path(profile) if profile is not None else file.parent / str(name)
        if not path.is_file():
            return False, f"needs the profile it was made with ({name}): pass --profile FILE", info
        got = quantize._file_hash(path)
        if got != recipe["profile_sha256"]:
            return False, (f"the profile differs: {path} has sha256 {got[:16]}..., {file.name} was made with "
                           f"{recipe['profile_sha256'][:16]}..."), info
        opts_profile = path
    scratch = Path(tempfile.mkdtemp(prefix=".quantcli-rebuild-", dir=file.resolve().parent))
    try:
        out = scratch / file.name
        opts = quantize.QuantizeOptions(
            input=Path(source), output=out, preset=recipe["preset"], profile=opts_profile, imatrix=opts_imatrix,
            include_weights=tuple(recipe["include_weights"]), exclude_weights=tuple(recipe["exclude_weights"]),
            output_tensor_type=recipe["output_tensor_type"], token_embedding_type=recipe["token_embedding_type"],
            tensor_types=tuple(tuple(t) for t in recipe["tensor_types"]), pure=recipe["pure"],
            leave_output_tensor=recipe["leave_output_tensor"], allow_requantize=recipe["allow_requantize"],
            override_kv=tuple(recipe["override_kv"]), protect_super_weights=recipe["protect_super_weights"],
            super_weight_type=recipe["super_weight_type"], date=str(reader.meta("quantcli.date")),
            imatrix_label=str(reader.meta("quantize.imatrix.file")) if opts_imatrix is not None else None,
            checkpoint_dir=scratch / "checkpoints", force=True)
        try:
            quantize.run(opts)
        except QuantcliError as exc:
            return False, f"the recipe does not run on {Path(source).name}: {exc.message}", info
        same, where = _compare(file, out)
        version = reader.meta("quantcli.version")
        import quantcli

        if same:
            return True, f"rebuilt from {Path(source).name}: identical bytes ({file.stat().st_size:,})", info
        note = (f" (made by quantcli {version}, this is {quantcli.__version__})"
                if version != quantcli.__version__ else "")
        return False, f"rebuilt from {Path(source).name}: differs at {where}{note}", info
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _compare(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two files are identical, and else the first metadata key or tensor that differs."""
    if a.stat().st_size == b.stat().st_size:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x, y = fa.read(16 << 20), fb.read(16 << 20)
                if x != y:
                    break
                if not x:
                    return True, ""
    with open_model(a) as ra, open_model(b) as rb:
        for key in sorted(set(ra.kv) | set(rb.kv)):
            va, vb = ra.kv.get(key), rb.kv.get(key)
            if va is None or vb is None or _value(va) != _value(vb):
                return False, f"metadata {key}"
        for name in ra.tensors:
            if name not in rb.tensors or ra.tensors[name].dtype != rb.tensors[name].dtype:
                return False, f"tensor {name} (type)"
            if ra.raw(name).tobytes() != rb.raw(name).tobytes():
                return False, f"tensor {name}"
    return False, "the layout (padding or order)"


def _value(kv: Any) -> Any:
    v = kv.value
    return v.tolist() if hasattr(v, "tolist") else (list(v) if not isinstance(v, (str, bytes, int, float)) else v)
