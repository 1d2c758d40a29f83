"""The bottom layer: what `searchsvc`, `workers` and `storage` all use, importing none of them.

    core.errors   SearchsvcError: the base of every error a user can cause (the CLI prints one line, exit 2)
    core.records  typed records ⇄ plain data: the config validator, canonical JSON
    core.names    did-you-mean, registry lookup, "module:function" loading, the integer and number checks
"""
