"""Typed exceptions raised by the `passes` library.

Every error a user can cause (a bad file, a bad pipeline string, a bad option) is a subclass of
`PassesError`; the CLI prints its message as one line and exits non-zero. Anything else is a bug.
"""

from __future__ import annotations


class PassesError(Exception):
    """Base class of every error the library raises on purpose."""


class ModelLoadError(PassesError):
    """The input is not a loadable, valid ONNX model (or reaches outside its directory)."""


class ModelSaveError(PassesError):
    """An output could not be written (or would overwrite the input)."""


class PipelineError(PassesError):
    """A pipeline string or pass option is malformed, or names an unknown pass."""


class PassContractError(PassesError):
    """A pass broke its contract: a failed `requires`/`ensures`, or `modified` that lied."""


class PassFailedError(PassesError):
    """A pass raised, or produced a graph that fails the ONNX checker."""


class FixpointError(PassesError):
    """A fixpoint group did not converge within its round limit."""


class VerificationError(PassesError):
    """A numeric comparison could not be run, or found a mismatch beyond tolerance."""


class SampleError(PassesError):
    """An unknown sample model name or invalid sample parameters."""


class TargetError(PassesError):
    """A target description that cannot be found, read or validated, or that TVM refuses."""
