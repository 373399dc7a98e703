"""fedtune secure aggregation: keys, Shamir shares, masking and the protocol state machines."""

from .errors import SecAggAbort, SecAggConfigError, SecAggError, SecAggIntegrityError
from .messages import (
    AdvertiseRequest,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    RoundTag,
    ShareRequest,
    UnmaskRequest,
    UnmaskShares,
)
from .protocol import InProcessResult, SecAggServer, SecAggSite, run_in_process, run_in_process_detailed
from .quantize import QuantSpec

__all__ = [
    "AdvertiseRequest",
    "EncryptedShares",
    "InProcessResult",
    "KeyAdvert",
    "MaskedInput",
    "MaskedInputRequest",
    "QuantSpec",
    "RoundTag",
    "SecAggAbort",
    "SecAggConfigError",
    "SecAggError",
    "SecAggIntegrityError",
    "SecAggServer",
    "SecAggSite",
    "ShareRequest",
    "UnmaskRequest",
    "UnmaskShares",
    "run_in_process",
    "run_in_process_detailed",
]
