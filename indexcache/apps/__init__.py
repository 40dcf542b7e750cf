"""Entry points, apart from the components they run (lingua's apps/): each composes a config, runs its job, exits.

Components (search, evaluation, training's run and trainer) never import these modules, `indexcache.cli` or
`indexcache.config`'s composition: the entry points import them.
"""
