"""The UICC file system as the card sees it: SELECT, READ BINARY, UPDATE BINARY (TS 102 221 §11.1).

Only transparent EFs exist. Each logical channel keeps its own ``FileSelection`` (current DF as
a path of FIDs from the MF, current EF); selections are paths, not object references, because
the card swaps in a new ``CardState`` after every persisted update.
"""

from __future__ import annotations

from dataclasses import dataclass

from est_agent.card.apdu import CommandApdu
from est_agent.card.tlv import encode_tlv
from est_agent.sim.reply import (
    SW_EOF_WARNING,
    SW_FUNCTION_NOT_SUPPORTED,
    SW_NO_EF,
    SW_NOT_FOUND,
    SW_OK,
    SW_P1P2,
    SW_SECURITY,
    SW_WRONG_LENGTH,
    SW_WRONG_OFFSET,
    Reply,
)
from est_agent.sim.state import MF_FID, AccessRule, CardState, DedicatedFile, ElementaryFile

__all__ = [
    "FileSelection",
    "current_ef",
    "read_binary",
    "select_by_fid_or_path",
    "select_by_name",
    "update_binary",
]

_P2_FCP = 0x04
_P2_NO_DATA = 0x0C
_P1_BY_FID = 0x00
_P1_PATH_FROM_MF = 0x08
_P1_PATH_FROM_DF = 0x09
_SFI_FLAG = 0x80  # READ/UPDATE BINARY P1 b8: short file identifier in P1 (not supported)

# Compact security attribute SC bytes (ISO/IEC 7816-4 §5.4.3.2): 00 always, FF never; ADM is
# shown as "user authentication" (b5), which a device can never satisfy here.
_SC_BYTE = {AccessRule.ALWAYS: 0x00, AccessRule.ADM: 0x10, AccessRule.NEVER: 0xFF}
_LIFE_CYCLE_OPERATIONAL = b"\x05"  # activated (TS 102 221 §11.1.1.4.9)


@dataclass
class FileSelection:
    """Current DF (path from the MF, MF included) and current EF of one logical channel."""

    df_path: tuple[bytes, ...] = (MF_FID,)
    ef: bytes | None = None

    def copy(self) -> FileSelection:
        return FileSelection(self.df_path, self.ef)


def _resolve_df(mf: DedicatedFile, path: tuple[bytes, ...]) -> DedicatedFile | None:
    if not path or path[0] != MF_FID:
        return None
    df = mf
    for fid in path[1:]:
        child = next((d for d in df.dfs if d.fid == fid), None)
        if child is None:
            return None
        df = child
    return df


def _child_ef(df: DedicatedFile, fid: bytes) -> ElementaryFile | None:
    return next((ef for ef in df.efs if ef.fid == fid), None)


def current_ef(mf: DedicatedFile, selection: FileSelection) -> ElementaryFile | None:
    if selection.ef is None:
        return None
    df = _resolve_df(mf, selection.df_path)
    return None if df is None else _child_ef(df, selection.ef)


def _by_fid(mf: DedicatedFile, df_path: tuple[bytes, ...], fid: bytes) -> FileSelection | None:
    """TS 102 221 §8.4.1: MF, current DF, its children, its parent and the parent's DFs."""
    if fid == MF_FID:
        return FileSelection()
    current = _resolve_df(mf, df_path)
    if current is None:
        return None
    if fid == current.fid:
        return FileSelection(df_path)
    if _child_ef(current, fid) is not None:
        return FileSelection(df_path, fid)
    if any(d.fid == fid for d in current.dfs):
        return FileSelection((*df_path, fid))
    if len(df_path) > 1:
        parent_path = df_path[:-1]
        if parent_path[-1] == fid:
            return FileSelection(parent_path)
        parent = _resolve_df(mf, parent_path)
        if parent is not None and any(d.fid == fid for d in parent.dfs):
            return FileSelection((*parent_path, fid))
    return None


def _by_path(
    mf: DedicatedFile, start: tuple[bytes, ...], fids: list[bytes]
) -> FileSelection | None:
    df_path = start
    for index, fid in enumerate(fids):
        df = _resolve_df(mf, df_path)
        if df is None:
            return None
        if any(d.fid == fid for d in df.dfs):
            df_path = (*df_path, fid)
        elif index == len(fids) - 1 and _child_ef(df, fid) is not None:
            return FileSelection(df_path, fid)
        else:
            return None
    return FileSelection(df_path)


def _fcp_ef(ef: ElementaryFile) -> bytes:
    security = bytes((0x03, _SC_BYTE[ef.update], _SC_BYTE[ef.read]))  # AM: update, read
    body = (
        encode_tlv(0x82, b"\x41\x21")  # working EF, transparent
        + encode_tlv(0x83, ef.fid)
        + encode_tlv(0x8A, _LIFE_CYCLE_OPERATIONAL)
        + encode_tlv(0x8C, security)
        + encode_tlv(0x80, ef.size.to_bytes(2, "big"))
    )
    return encode_tlv(0x62, body)


def _fcp_df(df: DedicatedFile) -> bytes:
    adm = _SC_BYTE[AccessRule.ADM]
    body = (
        encode_tlv(0x82, b"\x78\x21")  # DF
        + encode_tlv(0x83, df.fid)
        + (encode_tlv(0x84, df.name) if df.name else b"")
        + encode_tlv(0x8A, _LIFE_CYCLE_OPERATIONAL)
        # AM: delete child, create EF, create DF; all ADM
        + encode_tlv(0x8C, bytes((0x07, adm, adm, adm)))
    )
    return encode_tlv(0x62, body)


def _fcp(mf: DedicatedFile, target: FileSelection) -> bytes:
    df = _resolve_df(mf, target.df_path)
    assert df is not None  # targets come from successful lookups
    if target.ef is not None:
        ef = _child_ef(df, target.ef)
        assert ef is not None
        return _fcp_ef(ef)
    return _fcp_df(df)


def _select_reply(
    mf: DedicatedFile, selection: FileSelection, target: FileSelection, p2: int
) -> Reply:
    def apply() -> None:
        selection.df_path, selection.ef = target.df_path, target.ef

    data = b"" if p2 == _P2_NO_DATA else _fcp(mf, target)
    return Reply(SW_OK, data, exact=True, transient=apply)


def select_by_fid_or_path(selection: FileSelection, cmd: CommandApdu, mf: DedicatedFile) -> Reply:
    """SELECT with P1 00 (FID), 08 (path from MF) or 09 (path from the current DF)."""
    if cmd.p2 not in (0x00, _P2_FCP, _P2_NO_DATA):
        return Reply(SW_P1P2)
    data = cmd.data
    target: FileSelection | None
    if cmd.p1 == _P1_BY_FID:
        if not data:
            target = FileSelection()  # ISO/IEC 7816-4: P1 00 without data selects the MF
        elif len(data) != 2:
            return Reply(SW_WRONG_LENGTH)
        else:
            target = _by_fid(mf, selection.df_path, data)
    elif cmd.p1 in (_P1_PATH_FROM_MF, _P1_PATH_FROM_DF):
        if not data or len(data) % 2:
            return Reply(SW_WRONG_LENGTH)
        fids = [data[i : i + 2] for i in range(0, len(data), 2)]
        if cmd.p1 == _P1_PATH_FROM_MF:
            if fids[0] == MF_FID:  # TS 102 221 omits the MF; tolerate callers who include it
                fids = fids[1:]
            target = _by_path(mf, (MF_FID,), fids)
        else:
            target = _by_path(mf, selection.df_path, fids)
    else:
        return Reply(SW_P1P2)
    if target is None:
        return Reply(SW_NOT_FOUND)
    return _select_reply(mf, selection, target, cmd.p2)


def _find_named_df(
    df: DedicatedFile, name: bytes, path: tuple[bytes, ...]
) -> tuple[bytes, ...] | None:
    if df.name and df.name == name:
        return path
    for child in df.dfs:
        found = _find_named_df(child, name, (*path, child.fid))
        if found is not None:
            return found
    return None


def select_by_name(selection: FileSelection, cmd: CommandApdu, mf: DedicatedFile) -> Reply | None:
    """SELECT by DF name (P1 04); None when no DF carries that name."""
    path = _find_named_df(mf, cmd.data, (MF_FID,)) if cmd.data else None
    if path is None:
        return None
    if cmd.p2 not in (0x00, _P2_FCP, _P2_NO_DATA):
        return Reply(SW_P1P2)
    return _select_reply(mf, selection, FileSelection(path), cmd.p2)


def read_binary(selection: FileSelection, cmd: CommandApdu, mf: DedicatedFile) -> Reply:
    if cmd.p1 & _SFI_FLAG:
        return Reply(SW_FUNCTION_NOT_SUPPORTED)
    ef = current_ef(mf, selection)
    if ef is None:
        return Reply(SW_NO_EF)
    if ef.read is not AccessRule.ALWAYS:
        return Reply(SW_SECURITY)
    if cmd.le is None:
        return Reply(SW_WRONG_LENGTH)
    offset = (cmd.p1 << 8) | cmd.p2
    if offset >= ef.size:
        return Reply(SW_WRONG_OFFSET)
    remaining = ef.size - offset
    count = min(cmd.le, remaining)
    # Le 00 means "up to 256": only an explicit Le can promise more than the file holds.
    explicit = cmd.le not in (256, 65536)
    sw = SW_EOF_WARNING if explicit and cmd.le > remaining else SW_OK
    return Reply(sw, ef.data[offset : offset + count])


def update_binary(selection: FileSelection, cmd: CommandApdu, mf: DedicatedFile) -> Reply:
    if cmd.p1 & _SFI_FLAG:
        return Reply(SW_FUNCTION_NOT_SUPPORTED)
    if not cmd.data:
        return Reply(SW_WRONG_LENGTH)
    ef = current_ef(mf, selection)
    if ef is None:
        return Reply(SW_NO_EF)
    if ef.update is not AccessRule.ALWAYS:
        return Reply(SW_SECURITY)
    offset = (cmd.p1 << 8) | cmd.p2
    if offset >= ef.size:
        return Reply(SW_WRONG_OFFSET)
    if offset + len(cmd.data) > ef.size:
        return Reply(SW_WRONG_LENGTH)
    df_path, fid, data = selection.df_path, ef.fid, cmd.data

    def write(state: CardState) -> None:
        df = _resolve_df(state.mf, df_path)
        target = None if df is None else _child_ef(df, fid)
        if target is None:
            # A builtin on purpose: the file tree never changes shape after personalization,
            # so this is a broken invariant of the simulator (a bug, exit 70), not bad input.
            raise RuntimeError("selected EF vanished from the state")
        target.data = target.data[:offset] + data + target.data[offset + len(data) :]

    return Reply(SW_OK, update=write)
