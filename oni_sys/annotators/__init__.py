"""The annotator: labels captions (game messages) through an LLM and keeps every answer in a
SQLite store (docs/ANNOTATOR.md).

Entry points: :class:`~oni_sys.annotators.service.AnnotationService`,
:class:`~oni_sys.annotators.annotation_store.AnnotationStore`,
:func:`~oni_sys.annotators.backend_factory.make_backend` and the prompt builders in
:mod:`~oni_sys.annotators.prompts`.
"""
