-- Object keys name a version of a file (keys::DEFAULT_TEMPLATE and the rule
-- in README "Object keys"): every key template contains {version}, so a
-- replaced file lands beside the object announced for its earlier version
-- instead of overwriting it. Stored templates without {version} are rewritten
-- so that the file name stays the last segment of the key:
--   {path}            -> {dir}/{version}/{name}   (the old default
--                        {server}/{path} becomes the new default)
--   {dir} ... {name}  -> {dir} ... {version}/{name}
--   {name} alone      -> {dir}/{version}/{name}   ({dir} is empty on a
--                        non-recursive watch; on a recursive one it keeps
--                        a/x.csv and b/x.csv apart)
-- Objects already stored keep their keys (files.object_key); only files
-- assigned from now on use the new template. Overlapping watches that exist
-- already are left as they are: the API rejects any update of one of them
-- until the overlap is resolved.
UPDATE watches
SET key_template = CASE
        WHEN strpos(key_template, '{path}') > 0
            THEN replace(key_template, '{path}', '{dir}/{version}/{name}')
        WHEN strpos(key_template, '{dir}') > 0
            THEN replace(key_template, '{name}', '{version}/{name}')
        ELSE replace(key_template, '{name}', '{dir}/{version}/{name}')
    END,
    updated_at = now()
WHERE strpos(key_template, '{version}') = 0;

ALTER TABLE watches
    ALTER COLUMN key_template SET DEFAULT '{server}/{dir}/{version}/{name}';
