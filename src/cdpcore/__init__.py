"""cdpcore: continuous data protection.

Every write into a timestamped, checksummed journal; any microsecond can be
restored. See docs/api.md.
"""
from cdpcore import audit  # the module: audit.append(), audit.AuditLog
from cdpcore.errors import (
    CdpError,
    CorruptJournal,
    JournalExists,
    JournalNotFound,
    NotAJournal,
    PointError,
    CaptureRunning,
    RestoreError,
    UnsupportedVersion,
)
from cdpcore.format import Kind
from cdpcore.journal import Batch, Journal, PointInfo, VerifyReport
from cdpcore.point import Point, parse_point
from cdpcore.record import Record
from cdpcore.diff import Diff, FileChange, diff
from cdpcore.restore import RestoreResult, restore
from cdpcore.rollback import RollbackResult, rollback
from cdpcore.retention import Policy, PruneResult, prune
from cdpcore.timeline import Timeline, timeline
from cdpcore.replication import replication_status, vault_status
from cdpcore.capture import (BaselineResult, JournaledFile, ProtectResult, Protection, ResyncResult,
                             baseline, open, protect, resync)

__version__ = "0.1.0"

__all__ = [
    "Batch", "CaptureRunning", "Policy", "PruneResult", "prune", "CdpError", "Diff", "FileChange", "RollbackResult", "diff", "rollback", "CorruptJournal", "Journal", "JournalExists", "JournalNotFound",
    "Kind", "NotAJournal", "Point", "PointError", "PointInfo", "Record", "RestoreError",
    "RestoreResult", "Timeline", "UnsupportedVersion", "VerifyReport", "audit", "parse_point",
    "restore", "timeline", "BaselineResult", "JournaledFile", "ProtectResult", "Protection",
    "ResyncResult", "baseline", "open", "protect", "resync", "replication_status", "vault_status",
]
