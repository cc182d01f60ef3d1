"""The throttle: the rate's promise (schedule.py, pure), bound to the shared store
(valve.py). `Rate` and `EmergencyPolicy` are the public face (re-exported by the
package root); the rest is the reader's engine."""

from .rate import MAX_EXACT_LOG, EmergencyPolicy, Rate
from .schedule import Grant, Record
from .valve import Valve, key_for

__all__ = ["MAX_EXACT_LOG", "EmergencyPolicy", "Grant", "Rate", "Record", "Valve", "key_for"]
