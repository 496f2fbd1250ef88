import base64

from redis.crc import key_slot

from broker.keys import Keyspace, entry_id, is_generation_id, new_generation_id, seq_of


def test_generation_keys_share_one_hash_slot() -> None:
    ks = Keyspace("tokentee")
    for _ in range(50):
        gid = new_generation_id()
        keys = ks.generation(gid)
        slots = {key_slot(k.encode()) for k in keys.all()}
        assert len(slots) == 1
        assert all(f"{{{gid}}}" in k for k in keys.all())


def test_generation_ids_are_valid_and_unique() -> None:
    ids = {new_generation_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_generation_id(i) for i in ids)
    for gid in ids:
        # At least 128 random bits: 24 base64 characters decode to 18 random bytes.
        assert len(gid) == 25
        assert gid[0] == "g"
        assert len(base64.urlsafe_b64decode(gid[1:])) * 8 >= 128
    for bad in ["", "short", "a{b}cdefgh", "../../etc/passwd", "x" * 65, "abc defgh"]:
        assert not is_generation_id(bad)


def test_entry_ids_round_trip() -> None:
    for seq in (1, 2, 99, 10**12):
        assert seq_of(entry_id(seq)) == seq
        assert seq_of(entry_id(seq).encode()) == seq
    for bad in ("1-0", "0-x", "17", "0-"):
        try:
            seq_of(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
