"""Reading weight files that users supply (LPIPS, Inception): never unpickled."""

from pathlib import Path

import torch

from encdiff.errors import UserError


def read_tensor_file(path, what, layout_hint):
    """A flat name -> tensor dict from a .safetensors file or a torch.save file (read with
    weights_only=True). `what` names the setting in errors; `layout_hint` says where the expected
    key layout is documented."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: no such file: {path} (it does not exist)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure is a bad user file
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"{what}: cannot read {path} as .safetensors or torch.save weights ({type(e).__name__}: {reason})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise UserError(
            f"{what}: {path} is not a name -> tensor dict (a flat dict of tensors; key layout: {layout_hint})"
        )
    return state
