"""What counts as a number in the arguments a caller passes, and the one rule for seeds.

Any integer or real number type is accepted (numpy's np.int64, np.float32, ... included), and the checked
value is handed on as a plain Python int or float. bool is refused where a number is asked for: True as a
temperature or a token count is almost surely a mistake.
"""

import numbers
from typing import Optional

#: The seeds torch's generators accept (torch.manual_seed, torch.Generator.manual_seed): a signed or an
#: unsigned 64-bit integer.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def is_int(value) -> bool:
    """Whether value is an integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Whether value is a real number (an integer or a float, Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_float(value) -> Optional[float]:
    """value as a plain float when it is a real number that a float can hold (not a bool), else None."""
    if not is_real(value):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond the largest float
        return None


def check_positive_int(name: str, value) -> int:
    """value as a plain int when it is an integer >= 1, else ValueError naming it."""
    if not is_int(value) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(seed, name: str = "seed") -> int:
    """seed as a plain int when torch can seed a generator with it, else ValueError naming it and the rule."""
    # int() first: numpy's fixed-width integers do not compare with Python ints beyond their range.
    if not is_int(seed) or not SEED_MIN <= int(seed) <= SEED_MAX:
        raise ValueError(f"{name} must be an integer from -2**63 to 2**64 - 1 (what torch's generators accept), "
                         f"got {seed!r}")
    return int(seed)
