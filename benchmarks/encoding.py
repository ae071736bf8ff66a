"""Batch encoding: msgpack vs protobuf for a batch of 512 launch records (encode + decode).

Run: python benchmarks/encoding.py. The figure that chose msgpack for the data plane
(ARCHITECTURE.md, "Wire").
"""
import time, msgpack, statistics
from google.protobuf import struct_pb2
from google.protobuf.internal import api_implementation
print("protobuf impl", api_implementation.Type())
# a protobuf schema equivalent to a launch record, built dynamically
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
fdp = descriptor_pb2.FileDescriptorProto(name="b.proto", package="b", syntax="proto3")
m = fdp.message_type.add(name="Arg")
for i,(n,t) in enumerate([("tag",13),("handle",4),("offset",4)],1): m.field.add(name=n, number=i, type=t, label=1)
c = fdp.message_type.add(name="Call")
for i,(n,t) in enumerate([("op",13),("seq",4),("fn",4),("shared",13),("stream",4)],1): c.field.add(name=n, number=i, type=t, label=1)
c.field.add(name="grid", number=6, type=13, label=3); c.field.add(name="block", number=7, type=13, label=3)
c.field.add(name="args", number=8, type=11, label=3, type_name=".b.Arg")
bt = fdp.message_type.add(name="Batch"); bt.field.add(name="calls", number=1, type=11, label=3, type_name=".b.Call")
pool = descriptor_pool.DescriptorPool(); pool.Add(fdp)
Batch = message_factory.GetMessageClass(pool.FindMessageTypeByName("b.Batch"))
recs = [[9, i, 123456789012, [64,1,1], [256,1,1], 0, 0, [[0, 98765432109, 0], [1, 2.5, "float32"], [0, 98765432110, 4096]]] for i in range(512)]
def mp():
    f = msgpack.packb(recs); msgpack.unpackb(f)
def pb():
    b = Batch()
    for r in recs:
        c = b.calls.add(op=r[0], seq=r[1], fn=r[2], shared=r[5], stream=r[6]); c.grid.extend(r[3]); c.block.extend(r[4])
        c.args.add(tag=0, handle=r[7][0][1], offset=0); c.args.add(tag=1, handle=0, offset=0); c.args.add(tag=0, handle=r[7][2][1], offset=4096)
    s = b.SerializeToString(); b2 = Batch(); b2.ParseFromString(s); [ (x.op, x.fn, list(x.args)) for x in b2.calls]
for name, fn in (("msgpack", mp), ("protobuf", pb)):
    rates=[]
    for _ in range(5):
        t=time.perf_counter(); n=0
        while time.perf_counter()-t < 0.4: fn(); n+=512
        rates.append(n/(time.perf_counter()-t))
    print(name, "records/s (encode+decode)", int(statistics.median(rates)))
