"""The session protocol's two I/O-free cores: their rules, checked without any network."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harp
from harp import api, wire
from harp.errors import HarpError, ProtocolError
from harp.proto.codec import error_from_bytes, error_to_bytes
from harp.protocol import Calls, Chunk, ClientProtocol, Payload, Reply, ServerProtocol
from harp.server.session import Session


def test_every_api_call_is_on_the_wire_in_the_trace_format_and_served():
    from harp.trace import format as fmt
    for call in api.CALLS:
        assert wire.SCHEMA[call.op][0] == call.name
        assert hasattr(Session, "_" + call.key), call.key
        if call.trace_op:
            assert fmt.API_NAMES[call.trace_op] == call.name
    assert set(fmt.API_NAMES.values()) == set(api.NAMES)
    assert {fmt.API_NAMES[op] for op in fmt.SYNC_OPS} == set(api.SYNC_NAMES)


def test_async_calls_leave_in_full_batches():
    client = ClientProtocol(error_from_bytes)
    frames = [client.call([wire.FREE, i + 1, 7]) for i in range(wire.BATCH_CALLS * 2)]
    cut = [f for f in frames if f is not None]
    assert len(cut) == 2 and client.flush() is None
    event = ServerProtocol().receive(cut[0])
    assert isinstance(event, Calls) and not event.sync and len(event.records) == wire.BATCH_CALLS


def test_inline_payload_cuts_a_batch_before_it_would_pass_the_byte_limit():
    client = ClientProtocol(error_from_bytes)
    data = b"x" * wire.INLINE_LIMIT
    frames = [client.call([wire.WRITE, i + 1, 7, 0, 0, data], len(data)) for i in range(100)]
    assert all(len(f) < wire.BATCH_BYTES + 64 * 1024 for f in frames if f is not None)
    assert sum(f is not None for f in frames) == 100 * len(data) // wire.BATCH_BYTES


def test_a_sync_call_ends_its_batch_and_awaits_its_reply():
    client, server = ClientProtocol(error_from_bytes), ServerProtocol()
    client.call([wire.ALLOC, 1, 7, 64])
    frame = client.sync([wire.MEM_INFO, 2])
    event = server.receive(frame)
    assert event.sync and [r[0] for r in event.records] == [wire.ALLOC, wire.MEM_INFO]
    reply = client.receive(ServerProtocol.reply(2, None, [10, 20]))
    assert isinstance(reply, Reply) and reply.result == [10, 20]
    with pytest.raises(ProtocolError):                           # nothing more is due
        client.receive(ServerProtocol.reply(2, None, None))


def test_a_reply_for_another_call_breaks_the_session():
    client = ClientProtocol(error_from_bytes)
    client.sync([wire.SYNCHRONIZE, 5, None])
    with pytest.raises(ProtocolError, match="#4 while waiting for #5"):
        client.receive(ServerProtocol.reply(4, None, None))


def test_an_error_reply_raises_its_own_class():
    client = ClientProtocol(error_from_bytes)
    client.sync([wire.SYNCHRONIZE, 3, None])
    err = harp.QuotaError("over", call="alloc", seq=2)
    with pytest.raises(harp.QuotaError) as info:
        client.receive(ServerProtocol.reply(3, error_to_bytes(err), None))
    assert (info.value.call, info.value.seq) == ("alloc", 2)


def test_a_large_read_takes_exactly_its_payload():
    client = ClientProtocol(error_from_bytes)
    client.sync([wire.READ, 1, 7, 0, 10, 0])
    result = client.receive(ServerProtocol.reply(1, None, [10])).result
    assert client.read_data(result, 10) is None
    first = client.receive(b"12345")
    assert isinstance(first, Payload) and not first.done
    with pytest.raises(ProtocolError, match="6 bytes where 5 remained"):
        client.receive(b"123456")


def test_a_chunked_write_ends_its_batch_and_only_its_bytes_follow():
    client, server = ClientProtocol(error_from_bytes), ServerProtocol()
    frame = client.chunked_write([wire.WRITE_CHUNKED, 1, 7, 0, 0, 10])
    assert isinstance(server.receive(frame), Calls)
    with pytest.raises(ProtocolError, match="10 bytes of a chunked write were due"):
        ServerProtocol.receive(_copy(server), wire.batch_frame([[wire.FREE, 2, 7]], False))
    chunk = server.receive(client.payload_frame(memoryview(b"0123456789")[:4]))
    assert isinstance(chunk, Chunk) and bytes(chunk.data) == b"0123" and not chunk.last
    assert server.receive(client.payload_frame(b"456789")).last
    with pytest.raises(ProtocolError, match="where 0 remain"):
        server.receive(client.payload_frame(b"x"))


def _copy(server: ServerProtocol) -> ServerProtocol:
    other = ServerProtocol()
    other._left = server.expecting_payload
    return other


@pytest.mark.parametrize("records, sync, why", [
    ([[wire.MEM_INFO, 1], [wire.FREE, 2, 7]], True, "must end its batch"),
    ([[wire.WRITE_CHUNKED, 1, 7, 0, 0, 4], [wire.FREE, 2, 7]], False, "must end its batch"),
    ([[wire.FREE, 1, 7]], True, "sync batch must end with a sync call"),
    ([[wire.MEM_INFO, 1]], False, "sync batch must end with a sync call"),
    ([[wire.WRITE_CHUNKED, 1, 7, 0, 0, 0]], False, "at least one byte"),
])
def test_batch_rules(records, sync, why):
    with pytest.raises(ProtocolError, match=why):
        ServerProtocol().receive(wire.batch_frame(records, sync))


# -- the record decoder, fuzzed ---------------------------------------------------------

_scalar = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True), st.booleans(),
                    st.none(), st.text(max_size=8), st.binary(max_size=8))
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
_op = st.sampled_from(sorted(wire.SCHEMA) + [0, 99, -1])


@st.composite
def _record(draw):
    op = draw(_op)
    n = len(wire.SCHEMA.get(op, ("", ()))[1])
    args = draw(st.lists(_value, min_size=max(0, n - 1), max_size=n + 1))
    return [op, draw(st.one_of(st.integers(1, 50), _scalar)), *args]


@pytest.fixture(scope="module")
def fuzz_session():
    dev = harp.connect("local:cpu", memory="64MiB")
    session = Session(dev, "fuzz")
    yield session
    session.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_record(), min_size=1, max_size=6), sync=st.booleans())
def test_any_record_gets_a_typed_error_or_runs(fuzz_session, records, sync):
    """Whatever a client sends in a batch, the server's answer is a HarpError or a result:
    never another exception (which would end the session with no error record)."""
    server = ServerProtocol()
    try:
        frame = wire.batch_frame(records, sync)
    except (OverflowError, TypeError, ValueError):
        return                                      # msgpack cannot even encode it
    fuzz_session.last_seq = 0
    try:
        event = server.receive(frame)
        fuzz_session.handle(event)
    except HarpError:
        pass


@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=300))
def test_any_bytes_are_a_frame_or_a_protocol_error(frame):
    try:
        ServerProtocol().receive(frame)
    except ProtocolError:
        pass


def test_deeply_nested_arguments_are_refused_flat():
    nested: list = []
    for _ in range(990):
        nested = [nested]
    frame = wire.BATCH_TAG + msgpack.packb([[wire.LAUNCH, 1, 1, [1], [1], 0, 0, nested]])
    with pytest.raises(ProtocolError, match="malformed kernel argument"):
        ServerProtocol().receive(frame)


_int = st.one_of(st.integers(-5, 5), st.integers(-2**63, 2**64 - 1), st.sampled_from([7, 8, 0]))
_arg = st.one_of(
    st.tuples(st.just(wire.ARG_BUFFER), _int, _int).map(list),
    st.tuples(st.just(wire.ARG_SCALAR), st.one_of(_int, st.floats(), st.booleans()),
              st.sampled_from(["int64", "float32", "bool", "uint8", "complex64", "x", ""])).map(list),
    st.tuples(st.just(wire.ARG_ARRAY), _int, st.sampled_from(["float32", "int8", "V3", "O"]),
              st.lists(_int, max_size=3), _int,
              st.one_of(st.none(), st.lists(_int, max_size=3))).map(list))


def _typed(kind):
    if kind is int:
        return _int
    if kind is bytes:
        return st.binary(max_size=64)
    if kind is str:
        return st.one_of(st.sampled_from(["catalog", "numba-python", "ptx", "axpy_f32",
                                          "fill_f32", "gemm_f64"]), st.text(max_size=12))
    if kind is list:
        return st.one_of(st.lists(st.integers(-2, 2**31), min_size=1, max_size=3),
                         st.lists(_arg, max_size=8))
    return st.one_of(st.none(), _int)


@st.composite
def _well_formed(draw):
    op = draw(st.sampled_from(sorted(wire.SCHEMA)))
    return [op, 0, *[draw(_typed(t)) for t in wire.SCHEMA[op][1]]]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_well_formed(), min_size=1, max_size=8))
def test_well_formed_records_with_any_values_get_typed_errors(fuzz_session, records):
    """Records of the right shape with hostile values (negative and huge sizes, unknown
    handles and dtypes, odd kernel arguments) reach the backend and get typed errors."""
    records = [r for r in records if r[0] not in wire.SYNC_OPS and r[0] != wire.WRITE_CHUNKED]
    records += [[wire.SYNCHRONIZE, 0, None]]
    for i, r in enumerate(records):
        r[1] = i + 1
    fuzz_session.last_seq = 0
    try:
        event = ServerProtocol().receive(wire.batch_frame(records, True))
        reply = fuzz_session.handle(event)
    except ProtocolError:
        return
    assert reply is not None and (reply.error is None or isinstance(reply.error, HarpError))
