"""Writes a swallow configuration with N integrations, as the benchmark
scripts use it: one in five shares its channel with four others, each has
a trigger word of its own and one handler URL that nobody listens on.
Usage: python3 many-integrations.py PATH N AMQP_URL PREFIX"""
import sys

path, n, url, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(path, "w") as f:
    f.write(f'[broker]\nurl = "{url}"\nprefix = "{prefix}"\n\n')
    for k in range(n):
        channel = f"CS{k // 25}" if k % 5 == 0 else f"C{k}"
        f.write(f'[[integrations]]\nid = "i{k}"\nteam_id = "T0001"\nchannel = "{channel}"\n'
                f'trigger_words = ["b{k}:"]\nurls = ["http://127.0.0.1:9/i{k}"]\ntoken = "t"\n\n')
