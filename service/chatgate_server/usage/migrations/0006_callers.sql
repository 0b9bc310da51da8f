-- 0006: callers and their credentials (auth/). A caller is a service of a tenant; it
-- proves itself with one or more credentials: a token (only the SHA-256 of its secret
-- is kept) or a client-certificate identity (a URI SAN such as a SPIFFE id, or the
-- certificate's subject) that mTLS has verified.

CREATE TABLE callers (
    tenant         text        NOT NULL CHECK (length(tenant) BETWEEN 1 AND 128),
    name           text        NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    roles          text[]      NOT NULL DEFAULT '{}',
    -- NULL: every model the service allows.
    allowed_models text[],
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

CREATE TABLE caller_credentials (
    public_id    text        PRIMARY KEY,
    tenant       text        NOT NULL,
    caller_name  text        NOT NULL,
    token_sha256 bytea,
    cert_identity text        UNIQUE CHECK (length(cert_identity) <= 1024),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    FOREIGN KEY (tenant, caller_name) REFERENCES callers (tenant, name) ON DELETE CASCADE,
    CHECK ((token_sha256 IS NULL) <> (cert_identity IS NULL))
);

-- Every replica polls this one row (auth/table.py) and reloads its caller table when
-- the number moves; the triggers move it on any change to either table.
CREATE TABLE caller_table_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL
);
INSERT INTO caller_table_version VALUES (true, 0);

CREATE FUNCTION bump_caller_table_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE caller_table_version SET version = version + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER callers_changed AFTER INSERT OR UPDATE OR DELETE ON callers
    FOR EACH STATEMENT EXECUTE FUNCTION bump_caller_table_version();
CREATE TRIGGER caller_credentials_changed AFTER INSERT OR UPDATE OR DELETE ON caller_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION bump_caller_table_version();
