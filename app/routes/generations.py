"""Generations: POST /generate samples images (a job); GET a generation and its PNG.

Handlers only validate, write rows and publish job ids; workers do the computing.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response

from app import jobs
from app.deps import LimitedOperatorDep, OperatorDep, SessionDep, SettingsDep, WriterDep
from app.orm import Generation, Image
from app.routes.common import ERRORS, PNG, IdempotencyKey, PathId, Scale, check_limit, png_response
from app.routes.lookups import generations_for, key_in_use, replay, sampling_steps, serving_ensemble
from app.schemas import GenerateAccepted, GenerateCreate, GenerationPublic
from app.settings import Settings
from app.writer import Tx

router = APIRouter(tags=["generations"], responses=ERRORS)


@router.post("/generate", status_code=202, response_model=GenerateAccepted,
             summary="Sample images (asynchronously)")
async def generate(body: GenerateCreate, _: LimitedOperatorDep, writer: WriterDep, settings: SettingsDep,
                   idempotency_key: IdempotencyKey = None) -> GenerateAccepted:
    """Creates one generation per seed and a job that samples them. Poll `GET /jobs/{job_id}`;
    the same (ensemble, seed, steps) always gives the same generation and the same bytes."""
    check_limit("max_seeds_per_request", body.num_seeds(), settings, "number of seeds")
    if body.steps is not None:  # before any replay by Idempotency-Key, like every limit
        check_limit("max_steps", body.steps, settings, "steps")
    seeds = body.seed_list()
    return await writer.run(lambda tx: _generate(tx, body, seeds, settings, idempotency_key))


def _generate(tx: Tx, body: GenerateCreate, seeds: list[int], settings: Settings,
              idempotency_key: str | None) -> GenerateAccepted:
    s = tx.s
    old = replay(s, idempotency_key, "generate")
    if old is not None:
        return GenerateAccepted(job_id=old.id, **old.payload["response"])
    ens = serving_ensemble(tx, body.ensemble_id, settings)
    steps = sampling_steps(body.steps, ens, settings)
    gens = generations_for(s, ens.id, seeds, steps)
    ids = [g.id for g in gens]
    resp = {"generation_ids": ids, "ensemble_id": ens.id, "steps": steps}
    pending = any(g.status != "done" for g in gens)
    # Everything already sampled: a job that has succeeded, nothing to queue.
    done = None if pending else {"generation_ids": ids, "sampled": 0}
    with key_in_use(idempotency_key):
        job_id = jobs.new_job(s, "generate", {"generation_ids": ids, "response": resp},
                              idempotency_key=idempotency_key, done=done)
    if pending:
        tx.publish.append(job_id)
    return GenerateAccepted(job_id=job_id, **resp)


def _generation_public(g: Generation) -> GenerationPublic:
    return GenerationPublic(
        id=g.id, ensemble_id=g.ensemble_id, seed=g.seed, steps=g.steps, status=g.status,  # type: ignore[arg-type]
        image_url=f"/generations/{g.id}/image.png" if g.image_sha else None, image_sha256=g.image_sha,
        has_jacobian=g.jacobian is not None, created_at=g.created_at, finished_at=g.finished_at)


@router.get("/generations/{generation_id}", response_model=GenerationPublic, summary="A generation")
def get_generation(generation_id: PathId, _: OperatorDep, s: SessionDep) -> GenerationPublic:
    g = s.get(Generation, generation_id)
    if g is None:
        raise HTTPException(404, f"generation {generation_id} not found")
    return _generation_public(g)


@router.get("/generations/{generation_id}/image.png", responses=PNG, response_class=Response,
            summary="A generation's PNG")
def get_generation_image(generation_id: PathId, _: OperatorDep, s: SessionDep, scale: Scale = 1) -> Response:
    g = s.get(Generation, generation_id)
    if g is None:
        raise HTTPException(404, f"generation {generation_id} not found")
    if g.image_sha is None:
        raise HTTPException(404, f"generation {generation_id} is not sampled yet")
    img = s.get(Image, g.image_sha)
    assert img is not None
    return png_response(img.png, scale)
