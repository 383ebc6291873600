"""The wire contract between the agent and the appliance, shared by both and by `fuse/`.

Pure: no I/O library (trio, httpx, FastAPI, hypercorn, apsw) and no file system. What lives
here is what both sides must agree on, written once:

- `ids`         node and block ids, their patterns, and the base64 of binary fields;
- `limits`      wire limits (block size, blocks per node, batch sizes) the agent derives its
                own thresholds from;
- `errors`      every error `code` the API answers with, and the error body;
- `version`     the API version, sent with every answer and checked by the agent;
- `enrollment`  one-time enrollment codes and the proofs exchanged while redeeming one;
- `mdns`        the appliance's DNS-SD service type and its TXT record, built and parsed;
- `models`      the API's request and response bodies (pydantic), used by the appliance's
                routes to validate and document, and by the agent's client to read answers.

Import direction (checked by import-linter, see pyproject.toml): `agent` and `appliance`
import `protocol`; `protocol` imports neither.
"""
