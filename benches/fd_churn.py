#!/usr/bin/env python3
"""File-descriptor churn against a running edgeferry (loopback only).

Three threads each keep HELD silent TCP connections open to 127.0.0.1:PORT (never sending
CONNECT), replacing the oldest continuously, while a good device on another source address
(127.0.0.3) connects every 100 ms for 20 s. Prints good-device CONNECT->CONNACK p50/p99/max.
Usage: python3 benches/fd_churn.py PORT [HELD_PER_THREAD]   (raise `ulimit -n` first)
"""
import sys
PORT=int(sys.argv[1]); HELD=int(sys.argv[2]) if len(sys.argv)>2 else 4000
import socket,threading,time,struct,collections
stop=False; opened=[0]; held=[0]
def hostile():
    q=collections.deque()
    while not stop:
        try:
            s=socket.socket(); s.settimeout(2); s.connect(("127.0.0.1",PORT)); q.append(s); opened[0]+=1
        except Exception: pass
        if len(q)>HELD: q.popleft().close()
        held[0]=max(held[0],len(q))
ts=[threading.Thread(target=hostile) for _ in range(3)]
[t.start() for t in ts]
time.sleep(3)
def s_(b): return struct.pack(">H",len(b))+b
times=[];fails=[]
t_end=time.time()+20
i=0
while time.time()<t_end:
    i+=1
    t=time.time()
    try:
        s=socket.socket(); s.bind(("127.0.0.3",0)); s.settimeout(5); s.connect(("127.0.0.1",PORT))
        body=s_(b"MQTT")+bytes([4,2])+struct.pack(">H",30)+s_(b"good%d"%i)
        s.sendall(bytes([0x10,len(body)])+body)
        r=s.recv(4)
        if r[:1]!=b"\x20": raise Exception("no connack %r"%r)
        times.append(time.time()-t); s.sendall(b"\xe0\x00"); s.close()
    except Exception as e:
        fails.append(str(e))
    time.sleep(0.1)
stop=True
[t.join() for t in ts]
times.sort()
print("hostile sockets opened:",opened[0],"max held per thread:",held[0],"good connects:",len(times),"fails:",len(fails),fails[:3])
print("p50 %.1f ms p99 %.1f ms max %.1f ms"%(times[len(times)//2]*1000,times[int(len(times)*0.99)-1]*1000,times[-1]*1000))
