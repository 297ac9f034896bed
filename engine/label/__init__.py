"""``rlfuse label``: people rank sampled responses; their rankings train the reward model.

    rlfuse label sample  --model M [--adapter RUN/sft] --prompts prompts.jsonl -k 4 --out tasks.jsonl
    rlfuse label serve   tasks.jsonl --labels labels.jsonl [--port 8000] [--host 127.0.0.1] [--overlap N]
                         [--guidelines FILE.md]
    rlfuse label export  labels.jsonl --format rankings|pairs|trl [--trl-style conversational|standard] --out F
    rlfuse label stats   labels.jsonl

One concept per module: ``records`` (the tasks and labels files), ``sample`` (tasks from a
checkpoint), ``store`` (the append-only, fsynced label log and who sees what next),
``server`` (the HTTP API and the page, ``page.html``), ``export`` and ``stats``.
"""
