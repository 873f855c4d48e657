"""data_pipelines.tario against archives written by Python's tarfile in every header format."""
import io
import tarfile

import pytest

from data_pipelines.tario import TarError, shard_samples, tar_members


def _tar(members, fmt=tarfile.GNU_FORMAT, extra=()):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for d in extra:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


LONG = "d/" + "x" * 150 + "/000007.png"  # > 100 characters: GNU long name, pax path or ustar prefix


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_members_match_tarfile_in_every_format(fmt):
    members = [("000000.raw", b"\x01" * 700), ("000000.cls", b"3"), ("000001.raw", b""), (LONG, b"\x00\xff" * 300)]
    blob = _tar(members, fmt, extra=["somedir"])
    got = list(tar_members(io.BytesIO(blob)))
    assert got == members  # the directory entry is not a regular file; sizes not multiples of 512 are padded


def test_samples_grouped_by_key_like_webdataset():
    blob = _tar([("a/000000.raw", b"r0"), ("a/000000.cls", b"1"), ("a/000001.raw", b"r1"),
                 ("a/000001.CLS", b"2"), ("__meta__.json", b"{}"), ("a/000002.x.y", b"z")])
    samples = list(shard_samples([{"url": "u"}], lambda u: io.BytesIO(blob), lambda e: False))
    assert [s["__key__"] for s in samples] == ["a/000000", "a/000001", "a/000002"]
    assert samples[0] == {"__key__": "a/000000", "__url__": "u", "raw": b"r0", "cls": b"1"}
    assert samples[1]["cls"] == b"2" and samples[2]["x.y"] == b"z"


def test_damage_is_reported_with_the_shard_and_the_rest_continues():
    good = _tar([("000000.raw", b"a" * 600), ("000001.raw", b"b" * 600)])
    truncated = good[:512 + 100]  # header of the first member, then part of its data
    bad_sum = bytearray(good)
    bad_sum[0] ^= 0x20  # a changed name byte breaks the header checksum
    with pytest.raises(TarError, match="truncated"):
        list(tar_members(io.BytesIO(truncated), "t.tar"))
    with pytest.raises(TarError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(bad_sum)), "c.tar"))
    errors = []
    blobs = {"t.tar": truncated, "c.tar": bytes(bad_sum), "g.tar": good}
    samples = list(shard_samples([{"url": u} for u in blobs], lambda u: io.BytesIO(blobs[u]),
                                 lambda e: errors.append(e) or True))
    assert [s["__url__"] for s in samples] == ["g.tar", "g.tar"]  # no partial sample from the broken ones
    assert [e.args[-1] for e in errors] == ["t.tar", "c.tar"] and "t.tar" in errors[0].args[0]


def test_an_archive_cut_between_members_is_truncated_not_shorter():
    """Cut after a whole member (or empty), a shard would read as a shorter one and lose samples
    silently: tar writers end every archive with zero blocks, so a file without them is truncated."""
    good = _tar([("000000.raw", b"a" * 600), ("000001.raw", b"b" * 600)])
    assert [n for n, _ in tar_members(io.BytesIO(good))] == ["000000.raw", "000001.raw"]
    first_member = 512 + 1024  # its header and its data padded to 512-byte blocks
    for cut in (first_member, 0):
        got = []
        with pytest.raises(TarError, match=f"ends at byte {cut} without tar's end-of-archive blocks"):
            for name, _ in tar_members(io.BytesIO(good[:cut]), "t.tar"):
                got.append(name)
        assert got == (["000000.raw"] if cut else [])
