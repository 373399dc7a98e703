"""fedtune secure aggregation: keys, Shamir shares, masking and the protocol state machines."""

from .errors import SecAggAbort, SecAggConfigError, SecAggError, SecAggIntegrityError
from .messages import (
    AdvertiseRequest,
    ConsistencyRequest,
    EncryptedShares,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    RoundTag,
    ShareRequest,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
)
from .protocol import (
    THRESHOLD_FRACTION,
    InProcessResult,
    SecAggServer,
    SecAggSite,
    run_in_process,
    run_in_process_detailed,
    threshold_above,
)
from .quantize import QuantSpec

__all__ = [
    "THRESHOLD_FRACTION",
    "AdvertiseRequest",
    "ConsistencyRequest",
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
    "SurvivorSignature",
    "UnmaskRequest",
    "UnmaskShares",
    "run_in_process",
    "run_in_process_detailed",
    "threshold_above",
]
