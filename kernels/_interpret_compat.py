"""TRITON_INTERPRET=1 with NumPy >= 2.3: the interpreter turns a data-dependent loop bound into an int
with int(ndarray of shape (1,)), which NumPy now refuses. Make it take the single element instead."""
import os


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_ckv_patched", False):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._ckv_patched = True
    _interp._patch_lang_tensor = _patch_lang_tensor


apply()
