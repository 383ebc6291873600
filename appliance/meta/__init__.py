"""The appliance's metadata: accounts, the encrypted node tree, block references, grants and
the change journal, in SQLite (appliance.db's schema, migration 2).

Every function here takes an apsw connection and runs inside the caller's transaction
(appliance.meta.database opens and serialises them), so a request's changes commit together
or not at all.
"""
