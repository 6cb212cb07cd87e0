-- pgTAP: the metrics read API and tables respect the tenancy scope (runs after the
-- pg_regress suite, whose test 08 built the caches of the simulator gyms).
BEGIN;
SELECT plan(10);
SELECT ironwod_set_scope('11111111-1111-1111-1111-111111111111', 'aaaaaaaa-0000-0000-0000-000000000001');
SET LOCAL ROLE ironwod_test_app;

SELECT ok((SELECT count(*) > 0 FROM ironwod_dashboard('11111111-1111-1111-1111-111111111111',
           'aaaaaaaa-0000-0000-0000-000000000001', '2021-01-01', '2030-12-01')),
          'the app reads its own gym''s cache');
SELECT is((SELECT count(*) FROM ironwod.gym_monthly_metrics_cache
           WHERE gym_id <> 'aaaaaaaa-0000-0000-0000-000000000001'), 0::bigint,
          'RLS hides other gyms'' cache rows');
SELECT is((SELECT count(*) FROM ironwod.member_month_fact
           WHERE gym_id <> 'aaaaaaaa-0000-0000-0000-000000000001'), 0::bigint,
          'RLS hides other gyms'' member-month facts');
SELECT is((SELECT count(*) FROM ironwod.memberships
           WHERE gym_id <> 'aaaaaaaa-0000-0000-0000-000000000001'), 0::bigint,
          'RLS hides other gyms'' canonical rows');
SELECT throws_ok($$SELECT * FROM ironwod_dashboard('11111111-1111-1111-1111-111111111111',
                   'aaaaaaaa-0000-0000-0000-000000000002', '2025-01-01', '2025-12-01')$$,
                 '42501', NULL, 'another gym''s dashboard is refused');
SELECT throws_ok($$SELECT * FROM ironwod_explain('22222222-2222-2222-2222-222222222222',
                   'bbbbbbbb-0000-0000-0000-000000000001', '2025-01-01', 'churned_members')$$,
                 '42501', NULL, 'another tenant''s drill-down is refused');
SELECT throws_ok($$SELECT * FROM ironwod_explain('11111111-1111-1111-1111-111111111111',
                   'aaaaaaaa-0000-0000-0000-000000000001', '2025-01-01', 'vibes')$$,
                 '22023', 'unknown metric "vibes"', 'an unknown metric is 22023');
SELECT throws_ok($$SELECT ironwod.refresh_metrics_all()$$, '42501', NULL,
                 'the app cannot run the metrics compute');
SELECT throws_ok($$UPDATE ironwod.gym_monthly_metrics_cache SET members_end = 0$$, '42501', NULL,
                 'the app cannot write the cache');
SELECT throws_ok($$SELECT ironwod.transform_all()$$, '42501', NULL,
                 'the app cannot run the transforms');
SELECT * FROM finish();
ROLLBACK;
